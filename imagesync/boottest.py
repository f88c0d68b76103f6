"""The boot test: a rule's ``boot_test: {cloud, flavor, timeout}`` boots a new version on the
cloud before it spreads; a version that does not boot is quarantined.

Run by the daemon's pass between listing and planning. The planner holds a newest version
that has not passed (``plan.awaiting_boot_test``): it copies it to the boot test's cloud only,
hidden and marked ``imagesync.boot-test=pending``, and copies or retires nothing else of
that name. This step boots the version's image on that cloud (the original, when the version
first appeared there, or that hidden copy); it then gets ``imagesync.boot-test=passed
<time>`` (a hidden copy is shown) and the plan spreads it as usual. A version that fails (the
server goes to ERROR, or is not ACTIVE within the timeout) is quarantined: the booted image
is marked ``imagesync.quarantined=<why>`` and hidden if imagesync made it. The mark makes the
version no version to the planner (``plan.quarantined_versions``) wherever it is: not copied,
retiring nothing, and ``check`` keeps answering the previous good version, on every cloud,
including the one where a user uploaded the failing original (imagesync never hides an image
it did not make, so that original stays visible; imagesync just does not vouch for it). The
test server is always deleted. Tests run inside the pass, one at a time; a pass that has
just placed a boot test's copy runs a second round (test, plan, copy) so that the version
spreads in that pass (``daemon.passes.run_one_pass``).

Releasing a quarantine: remove the mark (``openstack image unset --property
imagesync.quarantined IMAGE``): the version is tested again on the next pass; delete the
hidden copy instead and it is copied and tested again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from imagesync.config.types import ImageRule
from imagesync.errors import ImageSyncError
from imagesync.model import PROP_BOOT_TEST, PROP_QUARANTINED, ImageRecord, SiteInventory
from imagesync.plan import assess, awaiting_boot_test, by_name, names_in, rule_for
from imagesync.sites.nova import Server
from imagesync.snapshot import Clock

log = structlog.get_logger("imagesync.boottest")

TESTED = PROP_BOOT_TEST
QUARANTINED = PROP_QUARANTINED
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
    def show_image(self, image_id: str) -> None: ...


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
    named = by_name(inventories)
    for name in names_in(inventories, rules):
        rule = rule_for(rules, name)
        if rule is None or rule.boot_test is None:
            continue
        bt = rule.boot_test
        sliced = named(name)
        a = assess(name, sliced, site_names, required=rule.sites)
        wait = awaiting_boot_test(a, sliced, bt.cloud)
        if wait is None or wait.image is None:
            continue  # nothing waits, or its copy to the boot test's cloud is still to come
        rec = wait.image
        made = rec.id in sliced[bt.cloud].made
        out.append(_test_one(nova_for(bt.cloud), rec, bt.flavor, bt.timeout, made, clock, now))
    return out


def _test_one(
    nova: BootNova,
    rec: ImageRecord,
    flavor: str,
    timeout: float,
    made: bool,
    clock: Clock,
    now: Callable[[], datetime],
) -> BootOutcome:
    """Boot ``rec``; mark it passed (and show it, if it was hidden for the test) or quarantined
    (and hide it, if imagesync made it)."""
    t0 = clock.now()
    log.info("boot_test.start", image=rec.name, cloud=nova.name, image_id=rec.id)
    try:
        _boot(nova, rec, flavor, timeout, clock)
    except ImageSyncError as exc:
        reason = f"boot test on {nova.name} failed: {exc}"[:250]
        nova.set_image_properties(rec.id, {QUARANTINED: reason})
        if made and not rec.hidden:
            nova.hide_image(rec.id)
        log.warning("boot_test.quarantined", image=rec.name, image_id=rec.id, reason=reason)
        result = exc.result if isinstance(exc, BootFailed) else "error"
        return BootOutcome(rec.name, nova.name, rec.id, False, reason, clock.now() - t0, result)
    stamp = now().strftime("%Y-%m-%dT%H:%M:%SZ")
    nova.set_image_properties(rec.id, {TESTED: f"passed {stamp}"})
    if rec.hidden:
        nova.show_image(rec.id)
    log.info("boot_test.passed", image=rec.name, image_id=rec.id, seconds=clock.now() - t0)
    return BootOutcome(rec.name, nova.name, rec.id, True, None, clock.now() - t0)
