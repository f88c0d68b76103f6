"""One reconcile pass of the daemon, and what it did.

A pass lists every site concurrently (removing what a crashed run left half-made), plans, and
executes the plan with copies in parallel within the overall and per-site limits
(``Engine.execute_concurrently``). :func:`run_one_pass` never raises: whatever a pass runs
into becomes a failed :class:`PassReport`, so the loop that calls it survives. Every event of
the executor is forwarded to the metrics and counted as a sign of life (``beat``) for the
watchdog. Images ignored because another project owns them are logged when that changes
(``IgnoredImages``), not on every pass.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from imagesync.boottest import BootOutcome, run_boot_tests
from imagesync.coordination import CLOUD_STEPS_KEY, CoordinationStatus, Coordinator, Health
from imagesync.daemon.live import LiveStatus
from imagesync.engine import ActionResult, Engine, Observer, Outcome
from imagesync.errors import ImageSyncError
from imagesync.metrics import Metrics
from imagesync.model import SiteInventory, format_time, printable
from imagesync.plan import Assessment, Copy, Ignored, Plan, Retire, plan
from imagesync.saving import SaveOutcome, SaveState, save_marked
from imagesync.snapshot import Clock
from imagesync.transfer import ErrorKind

# one logger name for the whole daemon package: the JSON log lines carry it
log = structlog.get_logger("imagesync.daemon")


@dataclass(frozen=True)
class PassReport:
    """What one pass did, for the log, STATUS= and tests."""

    started: datetime
    seconds: float
    copied: int = 0  # targets that received a verified copy
    failed: int = 0  # targets whose copy failed (not: busy elsewhere, cancelled)
    retired: int = 0
    retire_failed: int = 0
    skipped: int = 0
    unreachable: tuple[str, ...] = ()
    cancelled: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed and not self.retire_failed

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the status page."""
        return {
            "started": format_time(self.started),
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "copied": self.copied,
            "failed": self.failed,
            "retired": self.retired,
            "retire_failed": self.retire_failed,
            "skipped": self.skipped,
            "unreachable": list(self.unreachable),
            "cancelled": self.cancelled,
            "error": self.error,
        }

    def status(self) -> str:
        when = self.started.strftime("%H:%M:%S")
        if self.error is not None:
            return f"last pass {when}: FAILED: {self.error}"[:200]
        text = (
            f"last pass {when} ({self.seconds:.1f}s): {self.copied} copies, "
            f"{self.failed} failed, {self.retired} retired"
        )
        if self.unreachable:
            text += f"; unreachable: {', '.join(self.unreachable)}"
        if self.cancelled:
            text += "; cancelled"
        return text


def summarize_pass(
    started: datetime,
    seconds: float,
    results: list[ActionResult],
    skipped: int,
    unreachable: tuple[str, ...],
) -> PassReport:
    copied = failed = retired = retire_failed = 0
    cancelled = False
    for r in results:
        if isinstance(r.action, Copy):
            for t in r.targets:
                if t.ok:
                    copied += 1
                elif t.error_kind is ErrorKind.CANCELLED:
                    cancelled = True
                elif t.error_kind is not ErrorKind.BUSY:
                    failed += 1
            if not r.targets and not r.ok:
                if r.outcome is Outcome.CANCELLED:
                    cancelled = True
                else:
                    failed += 1
        elif isinstance(r.action, Retire):
            if not r.ok:
                retire_failed += 1
            elif r.outcome is not Outcome.KEPT:
                retired += 1
    return PassReport(
        started=started,
        seconds=seconds,
        copied=copied,
        failed=failed,
        retired=retired,
        retire_failed=retire_failed,
        skipped=skipped,
        unreachable=unreachable,
        cancelled=cancelled,
    )


@dataclass
class IgnoredImages:
    """Which images each managed name has that do not count (another project owns them),
    as last logged: a warning when that set changes for a name, not every pass."""

    logged: dict[str, frozenset[Ignored]] = field(default_factory=dict)

    def observe(self, assessments: Sequence[Assessment]) -> None:
        for a in assessments:
            now = frozenset(a.ignored)
            if now == self.logged.get(a.name, frozenset()):
                continue
            self.logged[a.name] = now
            if not now:
                log.info("image.ignored_gone", image=printable(a.name))
                continue
            for owner in sorted({i.owner or "" for i in now}):
                found = sorted(
                    (i for i in now if (i.owner or "") == owner), key=lambda i: (i.site, i.image_id)
                )
                log.warning(
                    "image.ignored",
                    image=printable(a.name),
                    reason=f"owned by project {printable(owner or '(none)')}",
                    images=[printable(f"{i.site}:{i.image_id}") for i in found],
                )


class PassWatch(Observer):
    """Forwards executor events to the metrics and the status page's live state, and counts
    each as a sign of life."""

    def __init__(
        self, metrics: Metrics, beat: Callable[[], None], live: LiveStatus | None = None
    ) -> None:
        self.metrics = metrics
        self.beat = beat
        self.live = live or LiveStatus()
        self.ignored = IgnoredImages()
        #: what the last pass's save step did (status page, tests)
        self.saves: list[SaveOutcome] = []
        #: the coordination as the last pass saw it (None: this host alone)
        self.coordination: CoordinationStatus | None = None

    def copy_started(self, copy: Copy) -> None:
        self.beat()
        self.metrics.copy_started(copy)
        self.live.copy_started(copy)

    def copy_progress(self, nbytes: int) -> None:
        self.beat()
        self.live.copy_progress(nbytes)

    def copy_finished(self, result: ActionResult) -> None:
        self.beat()
        self.metrics.copy_finished(result)
        self.live.copy_finished(result)

    def retire_finished(self, result: ActionResult) -> None:
        self.beat()
        self.metrics.retire_finished(result)


def run_one_pass(
    engine: Callable[[], Engine], *, cancel: threading.Event, watch: PassWatch
) -> PassReport:
    """Inventory every site, plan, execute. Never raises: a failed pass is reported.

    ``engine`` is called inside the pass, so that a failure to build one (a reloaded
    configuration naming a site that cannot be opened) is a failed pass, not a dead loop.
    """
    started = datetime.now(UTC)
    t0 = time.monotonic()
    try:
        eng = engine()
        coord = eng.coordinator
        why_not = _why_not_acting(coord, watch)
        acting = why_not is None
        inventories = eng.inventories(incremental=True)
        if acting:
            inventories = eng.recover(inventories)
        watch.beat()
        # only where Glance answered: an unreachable cloud costs its timeouts once, not twice
        reachable = {s for s, inv in inventories.items() if inv.ok}
        steps = acting and (coord is None or coord.owns(CLOUD_STEPS_KEY))
        watch.saves = save_step(eng, reachable, beat=watch.beat, live=watch.live) if steps else []
        watch.live.observe_saves([o.as_dict() for o in watch.saves])
        changed = {o.cloud for o in watch.saves if o.state is SaveState.SAVED}
        results: list[ActionResult] = []
        # A second round only when the first just put a boot test's copy in place (a version
        # from another site): it is booted now, and spreads in this pass if it passes, not a
        # poll interval later.
        for _ in range(2):
            if changed:  # list again: a new snapshot, a boot test's copy
                inventories = _relist(eng, changed)
            tested = boot_test_step(eng, inventories, beat=watch.beat) if steps else []
            watch.metrics.observe_boot_tests([t.result for t in tested])
            if tested:  # list again: a version marked tested, shown or hidden
                inventories = _relist(eng, {t.cloud for t in tested})
            watch.metrics.observe_inventories(inventories)
            p = _only_mine(plan(eng.rules, inventories, eng.site_names), coord, watch, acting)
            watch.ignored.observe(p.assessments)
            watch.live.observe_plan(_site_kinds(eng), inventories, p.assessments)
            done = eng.execute_concurrently(p, cancel=cancel, observer=watch)
            watch.live.observe_results(done)
            watch.metrics.observe_lag(p.assessments, done, time.time())
            results += done
            changed = _test_copies_placed(done)
            if not changed or cancel.is_set():
                break
        unreachable = tuple(s for s, inv in inventories.items() if not inv.ok)
        report = summarize_pass(started, time.monotonic() - t0, results, len(p.skips), unreachable)
        return report if why_not is None else dataclasses.replace(report, error=why_not)
    except ImageSyncError as exc:  # expected (a state_dir this user cannot write): one line
        log.error("pass.failed", error=str(exc))
        return PassReport(started=started, seconds=time.monotonic() - t0, error=str(exc))
    except Exception as exc:  # the loop must survive anything one pass runs into
        log.exception("pass.failed", error=str(exc))
        return PassReport(
            started=started, seconds=time.monotonic() - t0, error=f"{type(exc).__name__}: {exc}"
        )


def _only_mine(p: Plan, coord: Coordinator | None, watch: PassWatch, acting: bool) -> Plan:
    """The plan cut to the names this member drives (all of them when it runs alone): the
    names other members drive are theirs to change; none while it may not act."""
    if coord is None:
        return p
    mine = coord.drives(a.name for a in p.assessments)
    _observe_coordination(coord, watch, uploads=acting)
    return owned_only(p, mine.__contains__ if acting else lambda _name: False)


def _why_not_acting(coord: Coordinator | None, watch: PassWatch) -> str | None:
    """Why this pass must not change anything (the coordination is not healthy), or None.
    With several members (``coord``), the pass then drives only the names it owns."""
    if coord is None:
        return None
    health = coord.refresh()
    watch.coordination = coord.status()
    watch.metrics.observe_coordination(watch.coordination)
    if health is Health.OK:
        return None
    log.warning("pass.not_acting", reason=health.value)
    return f"coordination: {health.value}; not changing anything"


def _observe_coordination(coord: Coordinator, watch: PassWatch, *, uploads: bool) -> None:
    """The coordination as this pass ended up seeing it (who drives how many names, the
    uploads in flight in the whole group: one read, not tried while the service is away),
    for the status page and the metrics."""
    watch.coordination = coord.status(uploads=coord.uploads() if uploads else [])
    watch.metrics.observe_coordination(watch.coordination)
    watch.live.observe_coordination(watch.coordination.as_dict())


def _relist(eng: Engine, changed: set[str]) -> dict[str, SiteInventory]:
    """Every inventory again, the ``changed`` sites listed in full (imagesync changed them)."""
    for site in changed:
        eng.forget(site)
    return eng.recover(eng.inventories(incremental=True))


def _test_copies_placed(results: Sequence[ActionResult]) -> set[str]:
    """The sites where a boot test's copy (``Copy.hidden``) was just published."""
    return {
        t.site
        for r in results
        if isinstance(r.action, Copy) and r.action.hidden
        for t in r.targets
        if t.ok
    }


def owned_only(p: Plan, owns: Callable[[str], bool]) -> Plan:
    """PURE: the plan's copies and retirements of the names this member owns (the others'
    owners run them); every assessment stays, so ``check`` answers for all names here."""
    return Plan(
        actions=[a for a in p.actions if not isinstance(a, Copy | Retire) or owns(a.name)],
        assessments=p.assessments,
    )


#: how long one save-on-shutdown snapshot may take to become active
SAVE_TIMEOUT = 600.0


def save_step(
    eng: Engine,
    reachable: set[str],
    *,
    beat: Callable[[], None],
    timeout: float = SAVE_TIMEOUT,
    live: LiveStatus | None = None,
) -> list[SaveOutcome]:
    """Snapshot the marked servers that were shut down, on every cloud that has compute, one
    server at a time per cloud. A cloud whose Nova cannot be reached is logged and skipped:
    saving never fails the pass (the copies still run)."""
    from imagesync.sites.nova import NovaSnapshots

    out: list[SaveOutcome] = []

    def saving(o: SaveOutcome, what: str) -> None:  # the status page shows it while it runs
        if live is not None:
            live.observe_saving({**o.as_dict(), "saving": what})

    for name, cfg in eng.config.clouds.items():
        if name not in reachable:
            continue
        try:
            nova = NovaSnapshots(cfg, _session(eng, name))
            if not nova.has_compute():
                continue

            def record(image_id: str, image_name: str, cloud: str = name) -> None:
                eng.state.record_made(cloud, image_id, image_name)

            # waiting for a snapshot is a sign of life: the watchdog must not take it for a hang
            clock = Clock(sleep=_beating_sleep(beat))
            found = save_marked(
                nova, eng.rules, timeout=timeout, record=record, clock=clock, saving=saving
            )
        except ImageSyncError as exc:
            log.warning("save.cloud_failed", cloud=name, error=str(exc))
            continue
        finally:
            beat()
        for o in found:
            if o.state in (SaveState.SAVED, SaveState.FAILED, SaveState.REFUSED):
                log.info("save.outcome", **o.as_dict())
        out.extend(found)
    return out


def boot_test_step(
    eng: Engine, inventories: Mapping[str, SiteInventory], *, beat: Callable[[], None]
) -> list[BootOutcome]:
    """The rules' boot tests (``imagesync.boottest``), before the plan lets a version spread.
    A cloud whose Nova fails is logged: its versions wait (untested) for the next pass."""
    from imagesync.sites.nova import NovaSnapshots

    if not any(r.boot_test for r in eng.rules):
        return []
    novas: dict[str, NovaSnapshots] = {}

    def nova_for(cloud: str) -> NovaSnapshots:
        if cloud not in novas:
            cfg = eng.config.clouds[cloud]
            novas[cloud] = NovaSnapshots(cfg, _session(eng, cloud))
        return novas[cloud]

    try:
        return run_boot_tests(
            inventories,
            eng.rules,
            eng.site_names,
            nova_for,
            clock=Clock(sleep=_beating_sleep(beat)),
        )
    except ImageSyncError as exc:
        log.warning("boot_test.failed_to_run", error=str(exc))
        return []


def _session(eng: Engine, cloud: str) -> Any:  # a keystoneauth Session (sites only)
    """The cloud's keystoneauth session: the Glance site's (one token a cloud), else a new one."""
    from imagesync.sites.openstack import make_session

    session = getattr(eng.site(cloud), "session", None)
    return session if session is not None else make_session(eng.config.clouds[cloud])


def _beating_sleep(beat: Callable[[], None]) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        beat()
        time.sleep(seconds)

    return sleep


def _site_kinds(eng: Engine) -> dict[str, str]:
    """Every site, in the configuration's order: a cloud or a store."""
    return {
        s: "cloud" if s in eng.config.clouds else "store" if s in eng.config.stores else "site"
        for s in eng.site_names
    }


def log_report(report: PassReport) -> None:
    """One ``pass.done`` line: info when the pass went well, warning otherwise."""
    event = log.info if report.ok else log.warning
    event(
        "pass.done",
        seconds=round(report.seconds, 3),
        copied=report.copied,
        failed=report.failed,
        retired=report.retired,
        retire_failed=report.retire_failed,
        skipped=report.skipped,
        unreachable=list(report.unreachable),
        cancelled=report.cancelled,
        error=report.error,
    )
