"""``imagesync daemon``: the reconcile loop, signals, sd_notify and the watchdog, metrics.

Every ``poll_interval`` an APScheduler interval job (first run at once; one at a time; missed
runs coalesced) makes one *pass*: list every site concurrently (removing what a crashed run
left half-made), plan, and execute the plan with copies in parallel within the overall and
per-site limits (``Engine.execute_concurrently``). The main thread only waits for signals:

- SIGTERM / SIGINT: stop scheduling, cancel the running transfers (each aborts at its next
  chunk and removes its uploads), wait for the pass to wind down and exit 0. Should a transfer
  be stuck in the network past the grace period, the uploads this process leased are deleted
  from the main thread and the process exits anyway, well within systemd's stop timeout.
- SIGHUP: reload the configuration. An invalid file is logged (``config.reload_failed``) and
  the running configuration stays; a valid one applies from the next pass, which starts now.

Under systemd (``Type=notify``) it sends READY=1 once the scheduler runs, STATUS= after each
pass, STOPPING=1 at shutdown, and WATCHDOG=1 every ``WatchdogSec/2`` from a thread that only
pings while the loop is healthy: the scheduler runs, and a pass in progress shows signs of
life (bytes, finished actions) within ``stall_seconds``, or a new pass is not overdue.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor as JobPool
from apscheduler.schedulers.background import BackgroundScheduler

from imagesync.config.load import load_config
from imagesync.config.types import Config
from imagesync.errors import ImageSyncError
from imagesync.execute import ActionResult, Engine, Observer
from imagesync.metrics import Metrics
from imagesync.notify import Notifier, watchdog_interval
from imagesync.plan import Copy, Retire, plan
from imagesync.transfer import CANCELLED

log = structlog.get_logger("imagesync.daemon")

JOB_ID = "reconcile"
#: SIGTERM → exit: the pass gets this long to wind down (systemd waits TimeoutStopSec=45)
GRACE_SECONDS = 25.0
#: a pass showing no sign of life for this long is stuck: stop feeding the watchdog
STALL_SECONDS = 900.0


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

    def status(self) -> str:
        when = self.started.strftime("%H:%M:%S")
        if self.error is not None:
            return f"last pass {when}: FAILED: {self.error}"[:200]
        text = (f"last pass {when} ({self.seconds:.1f}s): {self.copied} copies, "
                f"{self.failed} failed, {self.retired} retired")
        if self.unreachable:
            text += f"; unreachable: {', '.join(self.unreachable)}"
        if self.cancelled:
            text += "; cancelled"
        return text


def summarize_pass(started: datetime, seconds: float, results: list[ActionResult],
                   skipped: int, unreachable: tuple[str, ...]) -> PassReport:
    copied = failed = retired = retire_failed = 0
    cancelled = False
    for r in results:
        if isinstance(r.action, Copy):
            for t in r.targets:
                if t.ok:
                    copied += 1
                elif t.error_kind == CANCELLED:
                    cancelled = True
                elif t.error_kind != "busy":
                    failed += 1
            if not r.targets and not r.ok:
                if r.detail == CANCELLED:
                    cancelled = True
                else:
                    failed += 1
        elif isinstance(r.action, Retire):
            if not r.ok:
                retire_failed += 1
            elif not r.detail.startswith("kept"):
                retired += 1
    return PassReport(started=started, seconds=seconds, copied=copied, failed=failed,
                      retired=retired, retire_failed=retire_failed, skipped=skipped,
                      unreachable=unreachable, cancelled=cancelled)


class _Watch(Observer):
    """Forwards executor events to the metrics and counts them as signs of life."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def copy_started(self, copy: Copy) -> None:
        self.daemon.beat()
        self.daemon.metrics.copy_started(copy)

    def copy_progress(self, nbytes: int) -> None:
        self.daemon.beat()

    def copy_finished(self, result: ActionResult) -> None:
        self.daemon.beat()
        self.daemon.metrics.copy_finished(result)

    def retire_finished(self, result: ActionResult) -> None:
        self.daemon.beat()
        self.daemon.metrics.retire_finished(result)


EngineFactory = Callable[[Config], Engine]


class Daemon:
    """The long-running process: configuration, engine, scheduler, signals, notifications."""

    def __init__(self, config: Config, config_path: Path | None = None, *,
                 engine_factory: EngineFactory = Engine, notifier: Notifier | None = None,
                 metrics: Metrics | None = None, grace_seconds: float = GRACE_SECONDS,
                 stall_seconds: float = STALL_SECONDS,
                 hard_exit: Callable[[int], Any] = os._exit) -> None:
        self.config = config
        self.config_path = config_path or config.path
        self.engine_factory = engine_factory
        self.notifier = notifier or Notifier()
        self.metrics = metrics or Metrics()
        self.grace_seconds = grace_seconds
        self.stall_seconds = stall_seconds
        self.hard_exit = hard_exit
        self.cancel = threading.Event()  # transfers abort when set
        self.stopping = threading.Event()
        self.last_report: PassReport | None = None
        self.scheduler: BackgroundScheduler | None = None
        self._engine: Engine | None = None
        self._engine_config: Config | None = None
        self._lock = threading.Lock()  # config and engine swaps
        self._reload_requested = False
        self._idle = threading.Event()  # no pass is running
        self._idle.set()
        self._heartbeat = time.monotonic()
        self._last_pass_end = time.monotonic()
        self._watch = _Watch(self)

    # -- one pass ----------------------------------------------------------------------------
    def beat(self) -> None:
        """A sign of life from the running pass (the watchdog looks at it)."""
        self._heartbeat = time.monotonic()

    def _current_engine(self) -> Engine:
        """The engine for the current configuration; rebuilt after a reload (between passes,
        so no transfer uses the sites being closed)."""
        with self._lock:
            config = self.config
            if self._engine is not None and self._engine_config is config:
                return self._engine
            old, self._engine = self._engine, None
        if old is not None:
            old.close()
            old.state.close()
        engine = self.engine_factory(config)
        with self._lock:
            self._engine, self._engine_config = engine, config
        return engine

    def run_pass(self) -> PassReport | None:
        """Inventory every site, plan, execute. Never raises: a failed pass is reported."""
        # Busy first, then look at cancel: shutdown sets cancel, then waits until idle, so
        # either it waits for this pass or this pass sees the cancel and does nothing.
        self._idle.clear()
        if self.cancel.is_set():
            self._idle.set()
            return None
        self.beat()
        started = datetime.now(UTC)
        t0 = time.monotonic()
        try:
            engine = self._current_engine()
            inventories = engine.inventories(incremental=True)
            self.beat()
            self.metrics.observe_inventories(inventories)
            unreachable = tuple(s for s, inv in inventories.items() if not inv.ok)
            p = plan(engine.rules, inventories, engine.site_names)
            results = engine.execute_concurrently(p, cancel=self.cancel, observer=self._watch)
            self.metrics.observe_lag(p.assessments, results, time.time())
            report = summarize_pass(started, time.monotonic() - t0, results, len(p.skips),
                                    unreachable)
        except Exception as exc:  # the loop must survive anything one pass runs into
            log.exception("pass.failed", error=str(exc))
            report = PassReport(started=started, seconds=time.monotonic() - t0,
                                error=f"{type(exc).__name__}: {exc}")
        finally:
            self._last_pass_end = time.monotonic()
            self._idle.set()
        self.metrics.observe_pass(report.ok, report.seconds)
        self.last_report = report
        event = log.info if report.ok else log.warning
        event("pass.done", seconds=round(report.seconds, 3), copied=report.copied,
              failed=report.failed, retired=report.retired, retire_failed=report.retire_failed,
              skipped=report.skipped, unreachable=list(report.unreachable),
              cancelled=report.cancelled, error=report.error)
        self.notifier.status(report.status())
        return report

    def _job(self) -> None:
        self.run_pass()

    # -- health --------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """Is the loop alive? (The watchdog pings only then.)"""
        if self.scheduler is None or not self.scheduler.running:
            return False
        now = time.monotonic()
        if not self._idle.is_set():
            return now - self._heartbeat < self.stall_seconds
        return now - self._last_pass_end < self.config.poll_interval + self.stall_seconds

    def _watchdog(self, interval: float, done: threading.Event) -> None:
        complained = False
        while not done.wait(interval):
            if self.healthy():
                self.notifier.watchdog()
                complained = False
            elif not complained:
                log.error("watchdog.unhealthy", reason="no sign of life from the reconcile "
                          "loop: no longer feeding the systemd watchdog")
                complained = True

    # -- reload --------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Read the configuration again; keep the running one if the new one is invalid."""
        self.notifier.reloading()
        path = self.config_path
        try:
            new = load_config(path)
        except ImageSyncError as exc:
            log.error("config.reload_failed", path=str(path), error=str(exc),
                      keeping="the running configuration")
            self.notifier.ready(status=f"reload failed, running configuration kept: {exc}")
            return False
        except Exception as exc:  # an unexpected bug in loading must not stop the daemon
            log.exception("config.reload_failed", path=str(path), error=str(exc),
                          keeping="the running configuration")
            self.notifier.ready(status="reload failed, running configuration kept")
            return False
        with self._lock:
            old, self.config = self.config, new
        if new.metrics_listen != old.metrics_listen:
            log.warning("config.reload_partial", key="metrics_listen",
                        reason="the metrics address changes at the next restart")
        if self.scheduler is not None and self.scheduler.running:
            if new.poll_interval != old.poll_interval:
                self.scheduler.reschedule_job(JOB_ID, trigger="interval",
                                              seconds=new.poll_interval)
            # apply the new configuration now rather than a whole interval later
            self.scheduler.modify_job(JOB_ID, next_run_time=datetime.now(UTC))
        log.info("config.reloaded", path=str(path), sites=list(new.site_names),
                 rules=len(new.images), poll_interval=new.poll_interval)
        self.notifier.ready(status="configuration reloaded")
        return True

    # -- signals -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        # Cancel at once: transfers start aborting while the main loop notices.
        self.cancel.set()
        self.stopping.set()

    def request_reload(self) -> None:
        self._reload_requested = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A handler runs between two bytecodes of the main thread, which might hold the lock
        # of an Event it is waiting on: setting that Event here would deadlock. So the main
        # thread never waits on an Event it can be signalled through; it polls flags, and
        # only the first SIGTERM touches an Event (the main loop holds none of their locks).
        if signum == signal.SIGHUP:
            self.request_reload()
        elif not self.stopping.is_set():
            self.request_stop()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # -- the whole life ------------------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> int:
        """Run until stopped; return the exit code."""
        config = self.config
        if config.metrics_listen:
            try:
                host, port = self.metrics.serve(config.metrics_listen)
            except (OSError, ValueError) as exc:
                log.error("metrics.listen_failed", listen=config.metrics_listen, error=str(exc))
                return 1
            log.info("metrics.listening", address=f"{host}:{port}")
        if install_signals:
            self.install_signal_handlers()
        self.scheduler = BackgroundScheduler(
            timezone=UTC, executors={"default": JobPool(max_workers=1)})
        self.scheduler.add_job(self._job, trigger="interval", seconds=config.poll_interval,
                               id=JOB_ID, next_run_time=datetime.now(UTC), max_instances=1,
                               coalesce=True, misfire_grace_time=None)
        self.scheduler.start()
        log.info("daemon.started", pid=os.getpid(), sites=list(config.site_names),
                 rules=len(config.images), poll_interval=config.poll_interval,
                 max_transfers=config.max_transfers, state_dir=str(config.state_dir))
        self.notifier.ready(status="running the first pass")
        dog_done = threading.Event()
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            threading.Thread(target=self._watchdog, args=(interval, dog_done), daemon=True,
                             name="watchdog").start()
        try:
            while not self.stopping.is_set():
                time.sleep(0.2)  # a signal interrupts nothing here; its flag is seen next
                if self._reload_requested and not self.stopping.is_set():
                    self._reload_requested = False
                    self.reload()
            return self._shutdown()
        finally:
            dog_done.set()
            self.notifier.close()
            self.metrics.close()

    def _shutdown(self) -> int:
        t0 = time.monotonic()
        log.info("daemon.stopping", pass_running=not self._idle.is_set())
        self.notifier.stopping(status="stopping: cancelling transfers")
        self.cancel.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if not self._idle.wait(self.grace_seconds):
            # A transfer is stuck (a connection that neither moves nor fails): remove what it
            # was writing from here, then leave without waiting for it.
            engine = self._engine
            removed = engine.remove_own_uploads() if engine is not None else 0
            log.error("daemon.abandoned", seconds=round(time.monotonic() - t0, 1),
                      removed_uploads=removed,
                      reason="a pass did not stop in time; its uploads were removed")
            logging.shutdown()
            sys.stdout.flush()
            self.hard_exit(0)
            return 0
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
            engine.state.close()
        log.info("daemon.stopped", seconds=round(time.monotonic() - t0, 2))
        return 0


def run_daemon(config: Config, config_path: Path | None = None) -> int:
    """``imagesync daemon``: run the reconcile loop until SIGTERM/SIGINT; the exit code.

    The CLI sends the daemon's log lines to stdout (journald reads them; it prints nothing
    else), where one-shot commands log to stderr and print their results on stdout.
    """
    return Daemon(config, config_path).run()
