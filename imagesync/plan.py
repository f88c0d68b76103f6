"""PURE planning: (rules, inventories) → an assessment per name and a list of typed actions.

No I/O, no clock, no clients: everything this module needs is in its arguments, so it is
tested with plain data (kopf's ``detect_changing_cause`` lesson). ``--dry-run`` prints what
``plan`` returns; the executor is the only place that acts on it.

Vocabulary
- only images owned by a project imagesync trusts on their site count (``SiteInventory.trusts``):
  the others are *ignored* (reported in the assessment, never a version, a source, a retirement
  or an answer);
- a *version* of a name is identified by its provenance (origin, version time, sha512);
- the *newest* version is the one imagesync saw first most recently (``Version.key``: its own
  clock, recorded in the state database), versions seen together ordered by version time
  (ties: sha512, then origin);
- a site's *cell* for a name says whether it holds the newest version (current), an older
  one (stale), a conflicting one with the same version time (mismatch), nothing (missing),
  or why we cannot say (unreachable, in-flight, not-copyable);
- a version some trusted image marks ``imagesync.quarantined`` failed its boot test: it is no
  version at all (the previous good one stays newest, is copied and answered, and is not
  retired by it); a newest version that waits for its rule's boot test is copied to the boot
  test's cloud only, hidden, and everything else for its name (copies, retention) is held
  until that copy passes (``awaiting_boot_test``, run by ``imagesync.boottest``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Literal, Protocol, TypeVar

from imagesync.model import PROP_BOOT_TEST, PROP_QUARANTINED, ImageRecord, SiteInventory, Version

CellState = Literal[
    "current", "stale", "missing", "mismatch", "unreachable", "in-flight", "not-copyable"
]


class BootTestRule(Protocol):
    """What the planner needs of a rule's ``boot_test``: the cloud it boots on."""

    @property
    def cloud(self) -> str: ...


class Rule(Protocol):
    """What the planner needs of an image rule. ``config.ImageRule`` satisfies it."""

    @property
    def pattern(self) -> str: ...
    @property
    def sites(self) -> tuple[str, ...]: ...
    @property
    def visibility(self) -> str: ...
    @property
    def min_copies(self) -> int: ...
    @property
    def keep(self) -> int | None: ...
    @property
    def retire(self) -> str: ...
    @property
    def on_mismatch(self) -> str: ...
    @property
    def boot_test(self) -> BootTestRule | None: ...


@dataclass(frozen=True)
class TargetRule:
    """A rule made on the spot: ``push NAME --to SITE`` for a name no configured rule matches."""

    pattern: str
    sites: tuple[str, ...]
    visibility: str = "private"
    min_copies: int = 0
    keep: int | None = None
    retire: str = "hide"
    on_mismatch: str = "report"
    boot_test: BootTestRule | None = None


class SkipReason(StrEnum):
    """Why the planner leaves a (name, site) alone. Typed, so nothing parses a message."""

    NO_VERSION = "no version"  # no active version on any reachable site
    UNREACHABLE = "site unreachable"
    IN_FLIGHT = "in flight"
    NOT_COPYABLE = "not copyable"
    MISMATCH = "mismatch"
    MIN_COPIES = "min_copies"  # not enough sites can hold a copy now
    NOT_OURS = "not made by imagesync"  # beyond retention, but kept: imagesync did not make it
    PROTECTED = "protected"
    IN_USE = "in use"
    BOOT_TEST = "awaiting boot test"  # held until the newest version boots on the rule's cloud

    @property
    def blocks(self) -> bool:
        """Does this skip mean the name could not be brought where it is wanted?"""
        return self in (
            SkipReason.NO_VERSION,
            SkipReason.UNREACHABLE,
            SkipReason.NOT_COPYABLE,
            SkipReason.MIN_COPIES,
        )


@dataclass(frozen=True)
class Cell:
    site: str
    state: CellState
    image: ImageRecord | None = None  # the image holding the newest version (current)
    have: Version | None = None  # the newest version this site holds (stale/mismatch)
    duplicates: tuple[str, ...] = ()  # other ids holding the same newest version
    required: bool = True


@dataclass(frozen=True)
class Ignored:
    """An image with the name that does not count: its owner is not trusted on its site."""

    site: str
    image_id: str
    owner: str | None


@dataclass(frozen=True)
class Assessment:
    name: str
    newest: Version | None
    source: ImageRecord | None  # a copyable record of the newest version
    not_copyable: str | None  # why the newest version cannot be copied
    cells: Mapping[str, Cell]
    versions: tuple[Version, ...] = ()
    #: images with this name owned by projects imagesync does not trust: left entirely alone
    ignored: tuple[Ignored, ...] = ()
    #: versions a boot test quarantined (``imagesync.quarantined``): not versions of the name
    quarantined: tuple[Version, ...] = ()


@dataclass(frozen=True)
class Copy:
    name: str
    version: Version
    source_site: str
    source_id: str
    targets: tuple[str, ...]
    visibility: str
    reason: str
    kind: Literal["copy"] = "copy"
    #: published hidden: the copy a boot test boots before the version may spread
    hidden: bool = False


@dataclass(frozen=True)
class Retire:
    name: str
    site: str
    image_id: str
    mode: str  # "hide" | "delete"
    version: Version
    reason: str
    kind: Literal["retire"] = "retire"


@dataclass(frozen=True)
class Skip:
    name: str
    site: str
    why: SkipReason
    reason: str  # for people: the sentence shown by status, --dry-run and the log
    kind: Literal["skip"] = "skip"


Action = Copy | Retire | Skip


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    assessments: list[Assessment] = field(default_factory=list)

    @property
    def copies(self) -> list[Copy]:
        return [a for a in self.actions if isinstance(a, Copy)]

    @property
    def retires(self) -> list[Retire]:
        return [a for a in self.actions if isinstance(a, Retire)]

    @property
    def skips(self) -> list[Skip]:
        return [a for a in self.actions if isinstance(a, Skip)]


R = TypeVar("R", bound=Rule)


def rule_for(rules: Sequence[R], name: str) -> R | None:
    """Exact names win over globs; otherwise the first matching rule."""
    for r in rules:
        if r.pattern == name:
            return r
    for r in rules:
        if fnmatchcase(name, r.pattern):
            return r
    return None


def _visible_versions(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    return [r for r in records if r.counts and not r.hidden]


def group_versions(records: Iterable[ImageRecord]) -> list[tuple[Version, list[ImageRecord]]]:
    """Group records that hold the same version; newest first, deterministic."""
    groups: list[tuple[Version, list[ImageRecord]]] = []
    ordered = sorted(records, key=lambda r: (r.version.key(), r.site, r.id), reverse=True)
    for rec in ordered:
        v = rec.version
        for i, (gv, members) in enumerate(groups):
            if any(m.version.same_as(v) for m in members):
                members.append(rec)
                if v.sha512 and not gv.sha512:  # learn the digest from a verified copy
                    groups[i] = (dataclasses.replace(gv, sha512=v.sha512), members)
                break
        else:
            groups.append((v, [rec]))
    groups.sort(key=lambda g: g[0].key(), reverse=True)
    return groups


def _pick(records: Sequence[ImageRecord]) -> ImageRecord:
    """Deterministic choice among duplicates: oldest upload first, then id."""
    return sorted(records, key=lambda r: (r.created_at, r.id))[0]


def quarantined_versions(records: Iterable[ImageRecord]) -> list[Version]:
    """The versions a boot test quarantined: any complete record (hidden or not) that carries
    the mark. The mark stays on the copy that failed, so the version stays quarantined while
    its original elsewhere is still visible (imagesync never hides what it did not make)."""
    return [v for v, _ in group_versions(r for r in records if r.counts and _quarantined(r))]


def _quarantined(rec: ImageRecord) -> bool:
    return bool(rec.properties.get(PROP_QUARANTINED))


#: ``imagesync.boot-test`` on the copy made for a boot test, from its creation until it passes
#: (so that the copy never counts as the version having spread, even if it is briefly visible)
BOOT_TEST_PENDING = "pending"


def _pending(rec: ImageRecord) -> bool:
    return rec.properties.get(PROP_BOOT_TEST) == BOOT_TEST_PENDING


def _good(records: Iterable[ImageRecord], quarantined: Sequence[Version]) -> list[ImageRecord]:
    """The visible versions' records, without those of a quarantined version."""
    return [
        r for r in _visible_versions(records) if not any(r.version.same_as(q) for q in quarantined)
    ]


def assess(
    name: str,
    inventories: Mapping[str, SiteInventory],
    sites: Sequence[str],
    *,
    required: Sequence[str] = (),
    prefer_source: str | None = None,
) -> Assessment:
    """Where the newest version of ``name`` is, site by site (``sites`` in display order).

    Only trusted images count; the others are listed in ``Assessment.ignored``."""
    records = [r for inv in inventories.values() if inv.ok for r in inv.trusted(name)]
    ignored = tuple(
        Ignored(r.site, r.id, r.owner)
        for inv in inventories.values()
        if inv.ok
        for r in sorted(inv.foreign(name), key=lambda r: r.id)
    )
    quarantined = quarantined_versions(records)
    groups = group_versions(_good(records, quarantined))
    newest: Version | None = groups[0][0] if groups else None
    holders = groups[0][1] if groups else []
    source, not_copyable = _source(newest, holders, sites, prefer_source)
    cells: dict[str, Cell] = {}
    for site in sites:
        inv = inventories.get(site)
        req = site in required
        if inv is None or not inv.ok:
            cells[site] = Cell(site, "unreachable", required=req)
        else:
            mine = inv.trusted(name)
            cells[site] = _cell(site, mine, _good(mine, quarantined), newest, not_copyable, req)
    return Assessment(
        name=name,
        newest=newest,
        source=source,
        not_copyable=not_copyable,
        cells=cells,
        versions=tuple(g[0] for g in groups),
        ignored=ignored,
        quarantined=tuple(quarantined),
    )


def _source(
    newest: Version | None,
    holders: Sequence[ImageRecord],
    sites: Sequence[str],
    prefer_source: str | None,
) -> tuple[ImageRecord | None, str | None]:
    """A copyable record of the newest version (its original's site first, then the sites'
    display order), or why there is none."""
    if not holders or newest is None:
        return None, None
    copyable = [r for r in holders if r.not_copyable_reason is None]
    if prefer_source is not None:
        copyable = [r for r in copyable if r.site == prefer_source]
    if not copyable:
        reasons = {r.not_copyable_reason for r in holders if r.not_copyable_reason}
        return None, "; ".join(sorted(reasons)) or (
            f"not on {prefer_source}" if prefer_source else "no copyable image"
        )
    origin_site = newest.origin.split(":", 1)[0]
    order = {s: i for i, s in enumerate(sites)}
    return sorted(
        copyable,
        key=lambda r: (
            # a converted copy holds other bytes than the version's sha512 names: copy from
            # one holding the original's bytes whenever there is one
            r.converted,
            r.site != origin_site,
            order.get(r.site, len(order)),
            r.created_at,
            r.id,
        ),
    )[0], None


def _cell(
    site: str,
    mine: Sequence[ImageRecord],
    visible: Sequence[ImageRecord],
    newest: Version | None,
    not_copyable: str | None,
    req: bool,
) -> Cell:
    """One reachable site's cell, from its trusted records (``visible``: those that count)."""
    same = [r for r in visible if newest is not None and r.version.same_as(newest)]
    if same:
        best = _pick(same)
        dups = tuple(r.id for r in same if r.id != best.id)
        return Cell(site, "current", image=best, have=newest, required=req, duplicates=dups)
    if any(r.in_progress for r in mine):
        return Cell(site, "in-flight", required=req)
    have = group_versions(visible)[0][0] if visible else None
    if have is not None and newest is not None and have.time == newest.time:
        return Cell(site, "mismatch", have=have, required=req)
    if not_copyable is not None and newest is not None:
        return Cell(site, "not-copyable", have=have, required=req)
    if have is not None:
        return Cell(site, "stale", have=have, required=req)
    return Cell(site, "missing", required=req)


@dataclass(frozen=True)
class BootTestWait:
    """The newest version of a name waits for its rule's boot test on ``cloud``."""

    name: str
    version: Version
    cloud: str
    #: the image to boot there: the version's original on that cloud, or the hidden copy
    #: imagesync made there for the test; None while no such image exists yet
    image: ImageRecord | None


def awaiting_boot_test(
    a: Assessment, inventories: Mapping[str, SiteInventory], cloud: str
) -> BootTestWait | None:
    """Does the newest version still wait for its boot test on ``cloud``? Not once any of its
    images says it passed, nor when it is visible on two sites already (it spread before the
    rule asked for a test: testing it now would hold nothing back)."""
    if a.newest is None:
        return None
    newest = a.newest
    holders = [
        r
        for inv in inventories.values()
        if inv.ok
        for r in inv.trusted(a.name)
        if r.counts and r.version.same_as(newest)
    ]
    if any(r.properties.get(PROP_BOOT_TEST, "").startswith("passed") for r in holders):
        return None
    if len({r.site for r in holders if not r.hidden and not _pending(r)}) > 1:
        return None
    on_cloud = inventories.get(cloud)
    made = on_cloud.made if on_cloud is not None else frozenset()
    # hidden: only the copy imagesync made for the test (another hidden image is no one's
    # to boot: retired, or someone's own)
    there = [r for r in holders if r.site == cloud and (not r.hidden or r.id in made)]
    return BootTestWait(a.name, newest, cloud, _pick(there) if there else None)


def by_name(
    inventories: Mapping[str, SiteInventory],
) -> Callable[[str], Mapping[str, SiteInventory]]:
    """``f(name)``: the inventories cut down to the images called ``name``.

    Planning looks up each name on each site several times; over thousands of names a scan of
    every image per lookup makes an idle pass quadratic, so the images are grouped once.
    """
    groups: dict[str, dict[str, list[ImageRecord]]] = {}
    for site, inv in inventories.items():
        if inv.ok:
            for rec in inv.images:
                groups.setdefault(rec.name, {}).setdefault(site, []).append(rec)
    empty: dict[str, list[ImageRecord]] = {}

    def sliced(name: str) -> dict[str, SiteInventory]:
        mine = groups.get(name, empty)
        return {
            site: inv if not inv.ok else dataclasses.replace(inv, images=tuple(mine.get(site, ())))
            for site, inv in inventories.items()
        }

    return sliced


def names_in(inventories: Mapping[str, SiteInventory], rules: Sequence[Rule]) -> list[str]:
    """Every name present on any site that some rule manages, sorted."""
    names = {r.name for inv in inventories.values() if inv.ok for r in inv.images}
    return sorted(n for n in names if rule_for(rules, n) is not None)


def plan_name(
    name: str,
    rule: Rule,
    inventories: Mapping[str, SiteInventory],
    all_sites: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
    prefer_source: str | None = None,
) -> tuple[Assessment, list[Action]]:
    """Actions bringing the newest version of ``name`` where ``rule`` (or ``targets``) wants it."""
    return _plan_name(
        name, rule, inventories, all_sites, targets=targets, prefer_source=prefer_source
    )


def _plan_name(
    name: str,
    rule: Rule,
    inventories: Mapping[str, SiteInventory],
    all_sites: Sequence[str],
    *,
    targets: Sequence[str] | None,
    prefer_source: str | None,
) -> tuple[Assessment, list[Action]]:
    required = tuple(targets) if targets else rule.sites
    shown = list(dict.fromkeys([*required, *all_sites]))
    a = assess(name, inventories, shown, required=required, prefer_source=prefer_source)
    if a.newest is None:
        return a, [
            Skip(name, "*", SkipReason.NO_VERSION, "no active version on any reachable site")
        ]
    # explicit targets (push --to, check --ensure) wait too: no path spreads an untested version
    if rule.boot_test is not None:
        wait = awaiting_boot_test(a, inventories, rule.boot_test.cloud)
        if wait is not None:
            return a, _hold_for_boot_test(rule, a, wait, required)
    wanted, actions = _wanted(name, rule, a, required)
    if rule.min_copies and not targets:
        actions.extend(_min_copies(name, rule, a, all_sites, wanted))
    if wanted and a.source is None:
        actions.extend(
            Skip(name, site, SkipReason.NOT_COPYABLE, f"not copyable: {a.not_copyable}")
            for site in wanted
        )
    elif wanted and a.source is not None:
        actions.append(
            Copy(
                name=name,
                version=a.newest,
                source_site=a.source.site,
                source_id=a.source.id,
                targets=tuple(wanted),
                visibility=rule.visibility,
                reason="missing or stale on " + ", ".join(wanted),
            )
        )
    actions.extend(_retention(name, rule, a, inventories))
    return a, actions


def _hold_for_boot_test(
    rule: Rule, a: Assessment, wait: BootTestWait, required: Sequence[str]
) -> list[Action]:
    """The newest version waits for its boot test: copy it (hidden) to the boot test's cloud
    if it is not there yet; hold every other copy and every retirement of this name."""
    actions: list[Action] = []
    cell = a.cells.get(wait.cloud)
    if wait.image is not None:
        why = f"booting {wait.version.short()} on {wait.cloud} ({wait.image.short_id}) first"
    elif cell is not None and cell.state in _LEFT_ALONE:
        why = f"{wait.cloud} must boot {wait.version.short()} first; " + _LEFT_ALONE[cell.state][1]
    elif a.source is None:
        why = f"{wait.cloud} must boot {wait.version.short()} first; not copyable: {a.not_copyable}"
    else:
        why = f"copied to {wait.cloud} first, hidden, to boot it"
        actions.append(
            Copy(
                name=a.name,
                version=wait.version,
                source_site=a.source.site,
                source_id=a.source.id,
                targets=(wait.cloud,),
                visibility=rule.visibility,
                reason=f"boot test on {wait.cloud} before it spreads",
                hidden=True,
            )
        )
    actions.extend(
        Skip(a.name, site, SkipReason.BOOT_TEST, why)
        for site in required
        if site != wait.cloud and a.cells[site].state != "current"
    )
    return actions


#: cells the planner leaves alone, and why
_LEFT_ALONE = {
    "unreachable": (SkipReason.UNREACHABLE, "site unreachable"),
    "in-flight": (SkipReason.IN_FLIGHT, "a copy is in flight"),
}


def _wanted(
    name: str, rule: Rule, a: Assessment, required: Sequence[str]
) -> tuple[list[str], list[Action]]:
    """The required sites that need the newest version, and skips for those left alone."""
    assert a.newest is not None
    wanted: list[str] = []
    actions: list[Action] = []
    for site in required:
        state = a.cells[site].state
        if state in ("stale", "missing") or (state == "mismatch" and rule.on_mismatch == "replace"):
            wanted.append(site)
        elif state == "mismatch":
            why = (
                f"mismatch: {site} holds different bytes with the same version time "
                f"{a.newest.short()}; left alone (on_mismatch: report)"
            )
            actions.append(Skip(name, site, SkipReason.MISMATCH, why))
        elif state in _LEFT_ALONE:
            actions.append(Skip(name, site, *_LEFT_ALONE[state]))
        elif state == "not-copyable":
            why = f"not copyable: {a.not_copyable}"
            actions.append(Skip(name, site, SkipReason.NOT_COPYABLE, why))
    return wanted, actions


def _min_copies(
    name: str, rule: Rule, a: Assessment, all_sites: Sequence[str], wanted: list[str]
) -> list[Action]:
    """Redundancy: keep at least ``min_copies`` of the newest version across the rule's own
    reachable sites (adds to ``wanted``); a shortfall is reported, never made up elsewhere.

    Only ``rule.sites`` count and only they are added: a copy placed on a site the rule does
    not name (say while one of its sites was briefly down) would never be reclaimed, since
    retention and placement only look after the sites a rule names. ``all_sites`` is kept in
    the signature for callers; it is not a pool to draw from.
    """
    own = [s for s in rule.sites if s in a.cells]
    current = [s for s in own if a.cells[s].state == "current"]
    short = rule.min_copies - len(current) - len([s for s in wanted if s in own])
    for site in own:
        if short <= 0:
            break
        if (
            site not in wanted
            and site not in current
            and a.cells[site].state in ("missing", "stale")
        ):
            wanted.append(site)
            short -= 1
    if short <= 0:
        return []
    why = f"min_copies {rule.min_copies}: only {rule.min_copies - short} sites can hold a copy now"
    return [Skip(name, "*", SkipReason.MIN_COPIES, why)]


def _retention(
    name: str, rule: Rule, a: Assessment, inventories: Mapping[str, SiteInventory]
) -> list[Action]:
    """Versions beyond the newest ``keep`` on a site that is current: retire them, safely."""
    out: list[Action] = []
    for site, cell in a.cells.items():
        inv = inventories.get(site)
        if inv is None or not inv.ok:
            continue
        if rule.on_mismatch == "replace" and cell.state == "current":
            for rec in _good(inv.trusted(name), a.quarantined):
                v = rec.version
                if a.newest and v.time == a.newest.time and not v.same_as(a.newest):
                    out.extend(_retire_one(name, site, rec, rule, inv, "replaced: mismatch"))
        if rule.keep is None or cell.state != "current":
            continue
        groups = group_versions(_good(inv.trusted(name), a.quarantined))
        for version, members in groups[rule.keep :]:
            for rec in members:
                out.extend(
                    _retire_one(
                        name, site, rec, rule, inv, f"beyond keep={rule.keep}: {version.short()}"
                    )
                )
        if rule.retire == "delete":
            out.extend(_delete_hidden(name, site, rule, inv, groups[: rule.keep]))
    return out


def _delete_hidden(
    name: str,
    site: str,
    rule: Rule,
    inv: SiteInventory,
    kept: Sequence[tuple[Version, list[ImageRecord]]],
) -> list[Action]:
    """With ``retire: delete``, old versions hidden earlier (``retire: hide`` before, or a
    previous pass) are deleted too: otherwise switching a rule to delete would leave them.

    Only copies imagesync recorded making (``inv.made``), unprotected, unused, older than every
    kept version; others are not reported each pass (they are hidden already, nobody sees
    them)."""
    if not kept or inv.in_use is None:
        # a site that cannot tell which images servers use hides instead of deleting (the
        # executor's fallback): its hidden copies stay hidden, not re-retired every pass
        return []
    oldest_kept = min(v.key() for v, _ in kept)
    out: list[Action] = []
    for rec in inv.trusted(name):
        if not (rec.hidden and rec.counts) or rec.id not in inv.made:
            continue
        if rec.protected or (inv.in_use is not None and rec.id in inv.in_use):
            continue
        v = rec.version
        if v.key() < oldest_kept and not any(v.same_as(k) for k, _ in kept):
            out.append(
                Retire(
                    name,
                    site,
                    rec.id,
                    "delete",
                    v,
                    f"hidden earlier, beyond keep={rule.keep}: {v.short()}",
                )
            )
    return out


def _retire_one(
    name: str, site: str, rec: ImageRecord, rule: Rule, inv: SiteInventory, why: str
) -> list[Action]:
    # Only what imagesync recorded publishing: provenance marks alone prove nothing (Nova
    # copies them into snapshots, anyone can set them). A copy another imagesync instance
    # made is not in this instance's state, so it is never retired here: the safe default.
    if rec.id not in inv.made:
        return [
            Skip(
                name,
                site,
                SkipReason.NOT_OURS,
                f"{rec.short_id} {why}, but not made by imagesync: kept",
            )
        ]
    if rec.protected:
        return [
            Skip(name, site, SkipReason.PROTECTED, f"{rec.short_id} {why}, but protected: kept")
        ]
    if inv.in_use is not None and rec.id in inv.in_use:
        return [
            Skip(name, site, SkipReason.IN_USE, f"{rec.short_id} {why}, but a server uses it: kept")
        ]
    return [Retire(name, site, rec.id, rule.retire, rec.version, why)]


def plan(
    rules: Sequence[Rule],
    inventories: Mapping[str, SiteInventory],
    all_sites: Sequence[str],
    *,
    names: Sequence[str] | None = None,
) -> Plan:
    """The whole reconcile plan: every managed name, every rule."""
    result = Plan()
    sliced = by_name(inventories)
    for name in names if names is not None else names_in(inventories, rules):
        rule = rule_for(rules, name)
        if rule is None:
            continue
        a, actions = plan_name(name, rule, sliced(name), all_sites)
        result.assessments.append(a)
        result.actions.extend(actions)
    return result
