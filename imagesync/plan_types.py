"""The planner's vocabulary (``plan.py``): the rules it reads (protocols the configuration's
rules satisfy), the typed cells, assessments and actions it returns, and how a name's records
group into versions (good ones: not quarantined, not waiting hidden for a boot test).

Pure, like the planner: imports only ``model``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Literal, Protocol, TypeVar

from imagesync.model import PROP_BOOT_TEST, PROP_QUARANTINED, ImageRecord, Version

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


def pick(records: Sequence[ImageRecord]) -> ImageRecord:
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


def pending(rec: ImageRecord) -> bool:
    return rec.properties.get(PROP_BOOT_TEST) == BOOT_TEST_PENDING


def good(records: Iterable[ImageRecord], quarantined: Sequence[Version]) -> list[ImageRecord]:
    """The visible versions' records, without those of a quarantined version."""
    return [
        r for r in _visible_versions(records) if not any(r.version.same_as(q) for q in quarantined)
    ]


#: cells the planner leaves alone, and why
LEFT_ALONE = {
    "unreachable": (SkipReason.UNREACHABLE, "site unreachable"),
    "in-flight": (SkipReason.IN_FLIGHT, "a copy is in flight"),
}
