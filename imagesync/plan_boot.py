"""Planning a name whose rule asks for a boot test: does its newest version still wait for
it (``awaiting_boot_test``, also read by ``imagesync.boottest``), and the actions while it
waits: copy it, hidden, to the boot test's cloud only, and hold everything else for the name.

Pure, like the planner: imports only ``model`` and the planner's types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from imagesync.model import PROP_BOOT_TEST, ImageRecord, SiteInventory, Version
from imagesync.plan_types import (
    LEFT_ALONE,
    Action,
    Assessment,
    Copy,
    Rule,
    Skip,
    SkipReason,
    pending,
    pick,
)


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
    if len({r.site for r in holders if not r.hidden and not pending(r)}) > 1:
        return None
    on_cloud = inventories.get(cloud)
    made = on_cloud.made if on_cloud is not None else frozenset()
    # hidden: only the copy imagesync made for the test (another hidden image is no one's
    # to boot: retired, or someone's own)
    there = [r for r in holders if r.site == cloud and (not r.hidden or r.id in made)]
    return BootTestWait(a.name, newest, cloud, pick(there) if there else None)


def hold_for_boot_test(
    rule: Rule, a: Assessment, wait: BootTestWait, required: Sequence[str]
) -> list[Action]:
    """The newest version waits for its boot test: copy it (hidden) to the boot test's cloud
    if it is not there yet; hold every other copy and every retirement of this name."""
    actions: list[Action] = []
    cell = a.cells.get(wait.cloud)
    if wait.image is not None:
        why = f"booting {wait.version.short()} on {wait.cloud} ({wait.image.short_id}) first"
    elif cell is not None and cell.state in LEFT_ALONE:
        why = f"{wait.cloud} must boot {wait.version.short()} first; " + LEFT_ALONE[cell.state][1]
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
