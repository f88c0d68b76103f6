"""The boot test: a rule's ``boot_test: {cloud, flavor, timeout}`` boots a new version on the
cloud before it spreads; a version that does not boot is quarantined.

Run by the daemon's pass between listing and planning. A version is tested while exactly one
site holds it (its first copy) and that site is the boot test's cloud; the image then gets
``imagesync.boot-test=passed <time>`` and the plan spreads it as usual. A version that fails
(the server goes to ERROR, or is not ACTIVE within the timeout) is quarantined where it is:
hidden, with ``imagesync.quarantined=<why>``. Hidden, it is no version to the planner
(``plan._visible_versions``): it is not copied, it retires nothing (retention counts only
visible versions) and ``check`` keeps answering the previous good version. The test server
is always deleted.

Limits (said plainly): a version whose first copy is on another site than the boot test's
cloud is not tested (logged ``boot_test.elsewhere``) and spreads; the test runs inside the
pass, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from imagesync.config.types import ImageRule
from imagesync.errors import ImageSyncError
from imagesync.model import ImageRecord, SiteInventory
from imagesync.plan import assess, names_in, rule_for
from imagesync.sites.nova import Server
from imagesync.snapshot import Clock

log = structlog.get_logger("imagesync.boottest")

TESTED = "imagesync.boot-test"
QUARANTINED = "imagesync.quarantined"
POLL = 1.0


class BootFailed(ImageSyncError):
    """The test server did not become ACTIVE; ``result`` says how (error, timeout)."""

    def __init__(self, message: str, result: str) -> None:
        super().__init__(message)
        self.result = result


class BootNova(Protocol):
    """What the boot test needs of a cloud's Nova (sites.nova.NovaSnapshots)."""

    name: str

    def flavor_id(self, flavor: str) -> str: ...
    def boot(self, name: str, image_id: str, flavor_id: str) -> str: ...
    def get_server(self, server_id: str) -> Server: ...
    def delete_server(self, server_id: str) -> None: ...
    def set_image_properties(self, image_id: str, props: Mapping[str, str]) -> None: ...
    def hide_image(self, image_id: str) -> None: ...


@dataclass(frozen=True)
class BootOutcome:
    name: str
    cloud: str
    image_id: str
    passed: bool
    reason: str | None = None
    seconds: float = 0.0
    #: for the metric: "passed", "error" (the server went into ERROR), "timeout"
    result: str = "passed"


def _boot(nova: BootNova, rec: ImageRecord, flavor: str, timeout: float, clock: Clock) -> None:
    """Boot, wait for ACTIVE, delete. Raises ImageSyncError saying why it did not boot."""
    start = clock.now()
    server_id = nova.boot(f"imagesync-boot-test-{rec.name}"[:250], rec.id, nova.flavor_id(flavor))
    try:
        while True:
            server = nova.get_server(server_id)
            if server.status == "ACTIVE":
                return
            if server.status == "ERROR":
                raise BootFailed(
                    f"the server went into ERROR: {server.fault or 'Nova gave no reason'}",
                    "error",
                )
            if clock.now() - start > timeout:
                raise BootFailed(
                    f"not ACTIVE within {timeout:.0f} s (it is {server.status})", "timeout"
                )
            clock.sleep(POLL)
    finally:
        try:
            nova.delete_server(server_id)
        except ImageSyncError as exc:
            log.warning(
                "boot_test.cleanup_failed", cloud=nova.name, server=server_id, error=str(exc)
            )


def run_boot_tests(
    inventories: Mapping[str, SiteInventory],
    rules: Sequence[ImageRule],
    site_names: Sequence[str],
    nova_for: Callable[[str], BootNova],
    *,
    clock: Clock | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[BootOutcome]:
    """Test every newest version that waits for its boot test; what became of each."""
    clock = clock or Clock()
    out: list[BootOutcome] = []
    for name in names_in(inventories, rules):
        rule = rule_for(rules, name)
        if rule is None or rule.boot_test is None:
            continue
        bt = rule.boot_test
        a = assess(name, inventories, site_names, required=rule.sites)
        holders = [c for c in a.cells.values() if c.state == "current" and c.image is not None]
        if a.newest is None or len(holders) != 1:
            continue  # nothing yet, or spread already (tested before it spread)
        rec = holders[0].image
        assert rec is not None
        if TESTED in rec.properties:
            continue
        if rec.site != bt.cloud:
            log.warning(
                "boot_test.elsewhere",
                image=name,
                site=rec.site,
                cloud=bt.cloud,
                reason="the version's first copy is not on the boot test's cloud: not tested",
            )
            continue
        nova = nova_for(bt.cloud)
        t0 = clock.now()
        log.info("boot_test.start", image=name, cloud=bt.cloud, image_id=rec.id)
        try:
            _boot(nova, rec, bt.flavor, bt.timeout, clock)
        except ImageSyncError as exc:
            reason = f"boot test on {bt.cloud} failed: {exc}"[:250]
            nova.set_image_properties(rec.id, {QUARANTINED: reason})
            nova.hide_image(rec.id)
            log.warning("boot_test.quarantined", image=name, image_id=rec.id, reason=reason)
            result = exc.result if isinstance(exc, BootFailed) else "error"
            out.append(BootOutcome(name, bt.cloud, rec.id, False, reason, clock.now() - t0, result))
            continue
        stamp = now().strftime("%Y-%m-%dT%H:%M:%SZ")
        nova.set_image_properties(rec.id, {TESTED: f"passed {stamp}"})
        log.info("boot_test.passed", image=name, image_id=rec.id, seconds=clock.now() - t0)
        out.append(BootOutcome(name, bt.cloud, rec.id, True, None, clock.now() - t0))
    return out
