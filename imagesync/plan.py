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

Beside it: ``plan_types.py`` (the rules it reads, the types it returns, versions),
``plan_boot.py`` (the boot-test hold) and ``plan_retention.py`` (what is retired, safely).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from imagesync.model import ImageRecord, SiteInventory, Version
from imagesync.plan_boot import BootTestWait, awaiting_boot_test, hold_for_boot_test
from imagesync.plan_retention import retention
from imagesync.plan_types import (
    BOOT_TEST_PENDING,
    LEFT_ALONE,
    Action,
    Assessment,
    BootTestRule,
    Cell,
    CellState,
    Copy,
    Ignored,
    Plan,
    Retire,
    Rule,
    Skip,
    SkipReason,
    TargetRule,
    good,
    group_versions,
    pick,
    quarantined_versions,
    rule_for,
)

# the planner's whole vocabulary, importable from here as before the split
__all__ = [
    "BOOT_TEST_PENDING",
    "Action",
    "Assessment",
    "BootTestRule",
    "BootTestWait",
    "Cell",
    "CellState",
    "Copy",
    "Ignored",
    "Plan",
    "Retire",
    "Rule",
    "Skip",
    "SkipReason",
    "TargetRule",
    "assess",
    "awaiting_boot_test",
    "by_name",
    "group_versions",
    "names_in",
    "plan",
    "plan_name",
    "quarantined_versions",
    "rule_for",
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
    groups = group_versions(good(records, quarantined))
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
            cells[site] = _cell(site, mine, good(mine, quarantined), newest, not_copyable, req)
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
        best = pick(same)
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
            return a, hold_for_boot_test(rule, a, wait, required)
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
    actions.extend(retention(name, rule, a, inventories))
    return a, actions


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
        elif state in LEFT_ALONE:
            actions.append(Skip(name, site, *LEFT_ALONE[state]))
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
