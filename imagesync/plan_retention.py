"""Retention, planned: on every site that holds a name's newest version, the versions beyond
the rule's ``keep`` (and, with ``on_mismatch: replace``, a conflicting copy) are retired, but
only copies imagesync recorded making, unprotected and unused by any server; the rest are
skipped, saying why. With ``retire: delete``, copies hidden earlier are deleted too.

Pure, like the planner: imports only ``model`` and the planner's types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from imagesync.model import ImageRecord, SiteInventory, Version
from imagesync.plan_types import (
    Action,
    Assessment,
    Retire,
    Rule,
    Skip,
    SkipReason,
    good,
    group_versions,
)


def retention(
    name: str, rule: Rule, a: Assessment, inventories: Mapping[str, SiteInventory]
) -> list[Action]:
    """Versions beyond the newest ``keep`` on a site that is current: retire them, safely."""
    out: list[Action] = []
    for site, cell in a.cells.items():
        inv = inventories.get(site)
        if inv is None or not inv.ok:
            continue
        if rule.on_mismatch == "replace" and cell.state == "current":
            for rec in good(inv.trusted(name), a.quarantined):
                v = rec.version
                if a.newest and v.time == a.newest.time and not v.same_as(a.newest):
                    out.extend(_retire_one(name, site, rec, rule, inv, "replaced: mismatch"))
        if rule.keep is None or cell.state != "current":
            continue
        groups = group_versions(good(inv.trusted(name), a.quarantined))
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
