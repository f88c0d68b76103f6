"""The ``imagesync daemon`` process: scheduler, signals, reload, sd_notify, shutdown.

Every ``poll_interval`` an APScheduler interval job (first run at once; one at a time; missed
runs coalesced) makes one *pass* (:mod:`imagesync.daemon.passes`). The main thread only waits
for signals:

- SIGTERM / SIGINT: stop scheduling, cancel the running transfers (each aborts at its next
  chunk and removes its uploads), wait for the pass to wind down and exit 0. Should a transfer
  be stuck in the network past the grace period, the uploads this process leased are deleted
  from the main thread and the process exits anyway, well within systemd's stop timeout.
- SIGHUP: reload the configuration. An invalid file is logged (``config.reload_failed``) and
  the running configuration stays; a valid one applies from the next pass, which starts now.

Under systemd (``Type=notify``) it sends READY=1 once the scheduler runs, STATUS= after each
pass, STOPPING=1 at shutdown, and WATCHDOG=1 every ``WatchdogSec/2`` from a thread that only
pings while the loop is healthy (:mod:`imagesync.daemon.health`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor as JobPool
from apscheduler.schedulers.background import BackgroundScheduler

from imagesync.config.load import load_config
from imagesync.config.types import Config
from imagesync.coordination import Coordinator, default_member_id, import_tooz
from imagesync.daemon.health import STALL_SECONDS, Clock, Health, feed_watchdog
from imagesync.daemon.live import LiveStatus
from imagesync.daemon.passes import PassReport, PassWatch, log_report, run_one_pass
from imagesync.daemon.statuspage import pages
from imagesync.engine import Engine
from imagesync.errors import ImageSyncError
from imagesync.metrics import Metrics
from imagesync.notify import Notifier, watchdog_interval

log = structlog.get_logger("imagesync.daemon")

JOB_ID = "reconcile"
#: SIGTERM → exit: the pass gets this long to wind down (systemd waits TimeoutStopSec=45)
GRACE_SECONDS = 25.0


EngineFactory = Callable[[Config], Engine]


class Daemon:
    """The long-running process: configuration, engine, scheduler, signals, notifications."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        engine_factory: EngineFactory = Engine,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        grace_seconds: float = GRACE_SECONDS,
        stall_seconds: float = STALL_SECONDS,
        hard_exit: Callable[[int], Any] = os._exit,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.config_path = config_path or config.path
        self.engine_factory = engine_factory
        self.notifier = notifier or Notifier()
        self.metrics = metrics or Metrics()
        self.grace_seconds = grace_seconds
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
        self.health = Health(stall_seconds, clock=clock)
        #: what the status page shows: fed by the pass and the executor, read by the listener
        self.live = LiveStatus()
        self.live.read_history_from(self._history)
        self._watch = PassWatch(self.metrics, self.beat, self.live)
        #: several daemons sharing the work (coordination:), joined with the first engine
        self.coordinator: Coordinator | None = None

    # -- one pass ----------------------------------------------------------------------------
    def beat(self) -> None:
        """A sign of life from the running pass (the watchdog looks at it)."""
        self.health.beat()

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
        if config.coordination is not None:
            engine.coordinate(self._coordinator(config, engine))
        with self._lock:
            self._engine, self._engine_config = engine, config
        return engine

    def _coordinator(self, config: Config, engine: Engine) -> Coordinator:
        """This daemon's membership, joined once (a reload keeps it; a changed coordination
        section takes a restart). Raises ConfigError when the service cannot be reached: the
        pass fails and the next one tries again."""
        if self.coordinator is None:
            cfg = config.coordination
            assert cfg is not None
            member = cfg.member_id or default_member_id(engine.state.instance_id)
            coordinator = Coordinator(cfg, member, instance_id=engine.state.instance_id)
            coordinator.start(join=True)
            self.coordinator = coordinator
        return self.coordinator

    def _history(self, limit: int) -> list[dict[str, Any]]:
        """Recent transfers, from the current engine's state database (none before one)."""
        engine = self._engine
        return engine.state.history(limit=limit) if engine is not None else []

    def run_pass(self) -> PassReport | None:
        """Inventory every site, plan, execute. Never raises: a failed pass is reported."""
        # Busy first, then look at cancel: shutdown sets cancel, then waits until idle, so
        # either it waits for this pass or this pass sees the cancel and does nothing.
        self._idle.clear()
        if self.cancel.is_set():
            self._idle.set()
            return None
        self.beat()
        try:
            report = run_one_pass(self._current_engine, cancel=self.cancel, watch=self._watch)
        finally:
            self.health.pass_ended()
            self._idle.set()
        self.metrics.observe_pass(report.ok, report.seconds)
        self.live.observe_report(report.as_dict())
        self.last_report = report
        log_report(report)
        self.notifier.status(report.status())
        return report

    def _job(self) -> None:
        self.run_pass()

    # -- health --------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """Is the loop alive? (The watchdog pings only then.)"""
        return self.health.healthy(
            scheduler_running=self.scheduler is not None and self.scheduler.running,
            pass_running=not self._idle.is_set(),
            poll_interval=self.config.poll_interval,
        )

    # -- reload --------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Read the configuration again; keep the running one if the new one is invalid."""
        self.notifier.reloading()
        path = self.config_path
        try:
            new = load_config(path)
        except ImageSyncError as exc:
            log.error(
                "config.reload_failed",
                path=str(path),
                error=str(exc),
                keeping="the running configuration",
            )
            self.notifier.ready(status=f"reload failed, running configuration kept: {exc}")
            return False
        except Exception as exc:  # an unexpected bug in loading must not stop the daemon
            log.exception(
                "config.reload_failed",
                path=str(path),
                error=str(exc),
                keeping="the running configuration",
            )
            self.notifier.ready(status="reload failed, running configuration kept")
            return False
        if new.coordination is not None:  # reload runs in the main thread: see import_tooz
            import_tooz()
        with self._lock:
            old, self.config = self.config, new
        if new.metrics_listen != old.metrics_listen:
            log.warning(
                "config.reload_partial",
                key="metrics_listen",
                reason="the metrics address changes at the next restart",
            )
        self.metrics.poll_interval.set(new.poll_interval)
        if self.scheduler is not None and self.scheduler.running:
            if new.poll_interval != old.poll_interval:
                self.scheduler.reschedule_job(JOB_ID, trigger="interval", seconds=new.poll_interval)
            # apply the new configuration now rather than a whole interval later
            self.scheduler.modify_job(JOB_ID, next_run_time=datetime.now(UTC))
        log.info(
            "config.reloaded",
            path=str(path),
            sites=list(new.site_names),
            rules=len(new.images),
            poll_interval=new.poll_interval,
        )
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
        self.metrics.poll_interval.set(config.poll_interval)
        if config.metrics_listen:
            try:
                host, port = self.metrics.serve(config.metrics_listen, pages=pages(self.live))
            except (OSError, ValueError) as exc:
                log.error("metrics.listen_failed", listen=config.metrics_listen, error=str(exc))
                return 1
            log.info("metrics.listening", address=f"{host}:{port}")
        if install_signals:
            self.install_signal_handlers()
        if config.coordination is not None:  # here, not in the pass's thread: see import_tooz
            import_tooz()
        self.scheduler = BackgroundScheduler(
            timezone=UTC, executors={"default": JobPool(max_workers=1)}
        )
        self.scheduler.add_job(
            self._job,
            trigger="interval",
            seconds=config.poll_interval,
            id=JOB_ID,
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.scheduler.start()
        log.info(
            "daemon.started",
            pid=os.getpid(),
            sites=list(config.site_names),
            rules=len(config.images),
            poll_interval=config.poll_interval,
            max_transfers=config.max_transfers,
            state_dir=str(config.state_dir),
        )
        self.notifier.ready(status="running the first pass")
        dog_done = threading.Event()
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            threading.Thread(
                target=feed_watchdog,
                args=(interval, dog_done, self.healthy, self.notifier.watchdog),
                daemon=True,
                name="watchdog",
            ).start()
        try:
            while not self.stopping.is_set():
                time.sleep(0.2)  # a signal interrupts nothing here; its flag is seen next
                if self._reload_requested and not self.stopping.is_set():
                    self._reload_requested = False
                    self.reload()
            return self.shutdown()
        finally:
            dog_done.set()
            self.notifier.close()
            self.metrics.close()

    def shutdown(self) -> int:
        """Stop scheduling, cancel the running pass and wait for it (at most the grace period,
        after which its uploads are removed from here and the process leaves); the exit code."""
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
            log.error(
                "daemon.abandoned",
                seconds=round(time.monotonic() - t0, 1),
                removed_uploads=removed,
                reason="a pass did not stop in time; its uploads were removed",
            )
            logging.shutdown()
            sys.stdout.flush()
            self.hard_exit(0)
            return 0
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
            engine.state.close()
        if self.coordinator is not None:  # our names move to the others at once
            self.coordinator.stop()
        log.info("daemon.stopped", seconds=round(time.monotonic() - t0, 2))
        return 0


def run_daemon(config: Config, config_path: Path | None = None) -> int:
    """``imagesync daemon``: run the reconcile loop until SIGTERM/SIGINT; the exit code.

    The CLI sends the daemon's log lines to stdout (journald reads them; it prints nothing
    else), where one-shot commands log to stderr and print their results on stdout.
    """
    return Daemon(config, config_path).run()
