"""The daemon's pass, concurrency limits, cancellation, reload, health and metrics, over
injected in-memory sites (no servers)."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from imagesync.config.load import load_config
from imagesync.config.types import Config, ImageRule, StoreConfig
from imagesync.daemon import Daemon, Health
from imagesync.daemon.health import feed_watchdog
from imagesync.engine import Engine
from imagesync.metrics import Metrics
from imagesync.model import NewImage
from imagesync.notify import Notifier
from imagesync.plan import plan
from imagesync.sites.directory import DirectorySite
from imagesync.sites.memory import Faults, MemorySite, MemoryWriter
from imagesync.state import State
from imagesync.transfer import ErrorKind, copy_image, new_image_for
from tests.fakeclock import FakeClock
from tests.unit.memconfig import memory_config

KB = 1000


class HookWriter(MemoryWriter):
    """A MemoryWriter that calls ``site.before_write()`` before every chunk."""

    def write(self, chunk: bytes) -> None:
        assert isinstance(self.site, HookSite)
        self.site.before_write()
        super().write(chunk)


class HookSite(MemorySite):
    """A MemorySite whose uploads can be slowed down or held, and which counts them."""

    def __init__(self, name: str, before_write: Callable[[], object] = lambda: None) -> None:
        super().__init__(name)
        self.before_write = before_write
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def create(self, new: NewImage) -> MemoryWriter:
        base = super().create(new)
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        return _Counted(self, base.stored)


class _Counted(HookWriter):
    def _done(self) -> None:
        assert isinstance(self.site, HookSite)
        with self.site._lock:
            self.site.active -= 1

    def finish(self) -> Any:
        try:
            return super().finish()
        finally:
            self._done()

    def abort(self) -> None:
        super().abort()
        self._done()


def config_for(tmp_path: Path, sites: list[str], **kw: Any) -> Config:
    return memory_config(tmp_path, sites, **kw)


def daemon_for(tmp_path: Path, sites: dict[str, MemorySite], **kw: Any) -> Daemon:
    config = config_for(
        tmp_path, list(sites), **{k: v for k, v in kw.items() if k in ("max_transfers", "rule")}
    )
    extra = {k: v for k, v in kw.items() if k not in ("max_transfers", "rule")}
    return Daemon(config, engine_factory=lambda c: Engine(c, sites=sites), **extra)


def visible(site: MemorySite, name: str) -> list[Any]:
    return [
        s.rec
        for s in site.images.values()
        if s.rec.name == name and s.rec.counts and not s.rec.hidden
    ]


def test_a_pass_converges_and_the_next_one_is_idle(tmp_path: Path) -> None:
    sites = {n: MemorySite(n) for n in ("c1", "c2", "c3")}
    sites["c1"].add("img-a", os.urandom(5 * KB))
    sites["c2"].add("img-b", os.urandom(7 * KB))
    d = daemon_for(tmp_path, sites)
    with capture_logs() as logs:
        report = d.run_pass()
    assert report is not None and report.ok
    assert report.copied == 4  # img-a to c2, c3; img-b to c1, c3
    for s in sites.values():
        assert len(visible(s, "img-a")) == 1 and len(visible(s, "img-b")) == 1
    events = [e["event"] for e in logs]
    assert events.count("copy.done") == 4 and "pass.done" in events
    again = d.run_pass()
    assert again is not None and again.copied == 0 and again.failed == 0
    assert "0 failed" in again.status()


def test_a_stuck_site_holds_only_its_own_slots_and_later_copies_pass_it(tmp_path: Path) -> None:
    """Copies read once for all targets (issue 11), so the first copies, which took a slot
    on the stuck site, wait with it (a real site's request timeout fails it there, and they
    finish elsewhere); every copy after them finds it at its limit and goes to the healthy
    sites without it, as long as those have slots to spare (here: 4 against its 2). With
    equal limits the copies behind wait for that timeout too: the price of one read."""
    gate = threading.Event()
    sites: dict[str, MemorySite] = {
        "c1": MemorySite("c1"),
        "stuck": HookSite("stuck", gate.wait),
        "c3": MemorySite("c3"),
        "c4": MemorySite("c4"),
    }
    names = [f"img-{i}" for i in range(4)]
    for n in names:
        sites["c1"].add(n, os.urandom(3 * KB))
    limits = {"stuck": 2, "c3": 4, "c4": 4}  # the memory sites take these stores' limits
    config = Config(
        path=tmp_path / "imagesync.yaml",
        state_dir=tmp_path / "state",
        poll_interval=60,
        clouds={},
        stores={
            n: StoreConfig(n, "directory", tmp_path, max_transfers=m) for n, m in limits.items()
        },
        images=(ImageRule(pattern="img*", clouds=("c1",), stores=tuple(limits)),),
        transfer_retries=1,
        max_transfers=6,
    )
    engine = Engine(config, sites=sites)
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    done: list[Any] = []
    runner = threading.Thread(target=lambda: done.append(engine.execute_concurrently(p)))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        later = names[2:]  # img-0 and img-1 hold the stuck site's two slots
        # (and the first two copies have started on the stuck site: threads lag on a loaded host)
        while time.monotonic() < deadline and not (
            all(len(visible(sites[s], n)) == 1 for s in ("c3", "c4") for n in later)
            and getattr(sites["stuck"], "active", 0) == 2
        ):
            time.sleep(0.02)
        # every later copy reached the healthy sites while the stuck site holds its uploads
        assert all(len(visible(sites[s], n)) == 1 for s in ("c3", "c4") for n in later)
        stuck = sites["stuck"]
        assert isinstance(stuck, HookSite)
        assert stuck.active == 2  # its own limit (2), no more: the rest wait in the queue
        assert not done
    finally:
        gate.set()
        runner.join(timeout=10)
    assert done and all(r.ok for r in done[0])
    assert all(len(visible(sites["stuck"], n)) == 1 for n in names)
    assert sites["stuck"].most_active <= 2  # type: ignore[attr-defined]


def test_overall_limit_is_respected(tmp_path: Path) -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def slow() -> None:
        time.sleep(0.002)

    sites: dict[str, MemorySite] = {"c1": MemorySite("c1")}
    for i in range(2, 6):
        sites[f"c{i}"] = HookSite(f"c{i}", slow)
    for i in range(4):
        sites["c1"].add(f"img-{i}", os.urandom(20 * KB))
    engine = Engine(config_for(tmp_path, list(sites), max_transfers=2), sites=sites)
    # each name lacks one site of its own: four one-target copies that could all run at once
    # (a copy reads once for all its targets, so copies to the same sites would queue anyway)
    import dataclasses

    first = plan(engine.rules, engine.inventories(), engine.site_names)
    for i, c in enumerate(first.copies):
        engine.executor.run_copy(
            dataclasses.replace(c, targets=tuple(t for t in c.targets if t != f"c{i + 2}"))
        )

    class Count(engine_observer()):  # type: ignore[misc]
        def copy_started(self, copy: Any) -> None:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)

        def copy_finished(self, result: Any) -> None:
            nonlocal running
            with lock:
                running -= 1

    p = plan(engine.rules, engine.inventories(), engine.site_names)
    results = engine.execute_concurrently(p, observer=Count())
    assert [c.targets for c in p.copies] == [("c2",), ("c3",), ("c4",), ("c5",)]
    assert len(results) == 4 and all(r.ok for r in results)
    assert most == 2


def engine_observer() -> type:
    from imagesync.engine import Observer

    return Observer


class SlowSource(MemorySite):
    """A source that sets ``cancel`` after ``after`` chunks (a SIGTERM arriving mid-copy)."""

    def __init__(self, name: str, cancel: threading.Event, after: int) -> None:
        super().__init__(name)
        self.cancel = cancel
        self.after = after

    def open(self, image: Any, offset: int = 0) -> Any:
        for i, chunk in enumerate(super().open(image, offset)):
            if i == self.after:
                self.cancel.set()
            yield chunk


class Watcher:
    def __init__(self) -> None:
        self.live: set[tuple[str, str]] = set()
        self.seen = 0

    def started(self, site: str, image_id: str) -> None:
        self.live.add((site, image_id))
        self.seen += 1

    def ended(self, site: str, image_id: str) -> None:
        self.live.discard((site, image_id))


def test_cancel_mid_copy_leaves_nothing_on_any_target(tmp_path: Path) -> None:
    cancel = threading.Event()
    src = SlowSource("src", cancel, after=5)
    rec = src.add("img", os.urandom(50 * KB))
    mem = MemorySite("mem")
    (tmp_path / "store").mkdir()
    store = DirectorySite("store", tmp_path / "store")
    new = new_image_for(rec, rec.version, "private")
    watcher = Watcher()
    result = copy_image(
        src, rec, [(mem, new), (store, new)], cancel=cancel, watcher=watcher, sleep=lambda s: None
    )
    assert result.cancelled and not result.ok
    assert result.bytes_read <= 6 * KB  # stopped at the next chunk, not at the end
    assert [t.error_kind for t in result.targets] == [ErrorKind.CANCELLED, ErrorKind.CANCELLED]
    assert all(t.attempts == 1 for t in result.targets)  # a cancel is never retried
    assert mem.images == {}
    assert list((tmp_path / "store").rglob("*")) == []  # no .partial, no .json, no folder
    assert watcher.seen == 2 and watcher.live == set()


def test_cancel_before_publishing_keeps_nothing_half_made(tmp_path: Path) -> None:
    cancel = threading.Event()
    src = SlowSource("src", cancel, after=49)  # the last chunk: the stream completes
    rec = src.add("img", os.urandom(50 * KB))
    targets = [MemorySite("t1"), MemorySite("t2")]
    new = new_image_for(rec, rec.version, "private")
    result = copy_image(src, rec, [(t, new) for t in targets], cancel=cancel)
    assert result.cancelled
    assert all(t.images == {} for t in targets)


def test_stopping_during_a_pass_cancels_it_at_the_next_chunk(tmp_path: Path) -> None:
    written = 0
    stop: list[Callable[[], None]] = []

    def count_and_stop_at_the_fifth() -> None:
        nonlocal written
        written += 1
        if written == 5:
            stop[0]()  # SIGTERM arrives while the fifth chunk is being written

    slow = HookSite("c2", count_and_stop_at_the_fifth)
    sites: dict[str, MemorySite] = {"c1": MemorySite("c1"), "c2": slow}
    sites["c1"].add("img-big", os.urandom(200 * KB))  # 200 chunks
    d = daemon_for(tmp_path, sites)
    stop.append(d.request_stop)
    report = d.run_pass()
    assert written == 5  # the copy stopped at the next chunk, not at the end
    assert report is not None and report.cancelled and report.failed == 0
    assert slow.images == {}
    state = State(tmp_path / "state")
    assert state.leases() == []
    assert state.history("img-big")[0]["result"] == ErrorKind.CANCELLED


def test_a_stuck_transfer_at_shutdown_has_its_uploads_removed(tmp_path: Path) -> None:
    gate = threading.Event()  # never opened: the source read hangs like a dead connection

    def hang_reads(op: str, image_id: str | None) -> None:
        if op == "open":
            gate.wait()

    # (a stuck upload no longer holds a pass: the transfer aborts it, see test_transfer)
    stuck = MemorySite("c2")
    sites: dict[str, MemorySite] = {"c1": MemorySite("c1", Faults(hook=hang_reads)), "c2": stuck}
    sites["c1"].add("img-a", os.urandom(5 * KB))
    exits: list[int] = []
    d = daemon_for(tmp_path, sites, grace_seconds=0.5, hard_exit=exits.append)
    t = threading.Thread(target=d.run_pass, daemon=True)
    t.start()
    state = State(tmp_path / "state")
    deadline = time.monotonic() + 10
    while not state.leases() and time.monotonic() < deadline:  # leased once created
        time.sleep(0.01)
    assert stuck.images and state.leases(), "the upload was not leased"
    d.request_stop()
    with capture_logs() as logs:
        d.shutdown()
    assert exits == [0]
    assert stuck.images == {}  # removed from the main thread
    assert any(e["event"] == "daemon.abandoned" and e["removed_uploads"] == 1 for e in logs)
    gate.set()
    t.join(timeout=5)


def test_leases_of_a_dead_run_are_removed_by_recovery_not_by_reading(tmp_path: Path) -> None:
    sites = {n: MemorySite(n) for n in ("c1", "c2")}
    src = sites["c1"].add("img-a", os.urandom(KB))
    # A crashed run's upload, still marked as one (an unmarked image is never removed: it may
    # have been published since the lease was taken, see tests/unit/test_recovery.py)
    w = sites["c2"].create(new_image_for(src, src.version, "private"))
    w.write(b"x")
    engine = Engine(config_for(tmp_path, list(sites)), sites=sites)
    engine.state._exec(
        "INSERT INTO leases VALUES (?,?,?,?,?)", ("c2", w.image_id, "img-a", 999999, time.time())
    )
    listed = engine.inventories()
    assert w.image_id in sites["c2"].images  # reading never deletes
    assert len(engine.state.leases()) == 1
    with capture_logs() as logs:
        inventories = engine.recover(listed)
    assert w.image_id not in sites["c2"].images
    assert all(r.id != w.image_id for r in inventories["c2"].images)
    assert engine.state.leases() == []
    assert any(e["event"] == "cleanup.leftover" for e in logs)


def test_a_lease_whose_lock_is_held_is_left_alone(tmp_path: Path) -> None:
    sites = {n: MemorySite(n) for n in ("c1", "c2")}
    src = sites["c1"].add("img-a", os.urandom(KB))
    w = sites["c2"].create(new_image_for(src, src.version, "private"))
    engine = Engine(config_for(tmp_path, list(sites)), sites=sites)
    engine.state.add_lease("c2", w.image_id, "img-a")
    other = State(tmp_path / "state")  # another live imagesync is writing it
    with other.lock("img-a", "c2"):
        engine.recover(engine.inventories())
    assert w.image_id in sites["c2"].images and len(engine.state.leases()) == 1


def _write_config(path: Path, tmp_path: Path, poll: str = "1m") -> None:
    from tests.unit.test_daemon_process import _config

    for d in ("a", "b"):
        (tmp_path / d).mkdir(exist_ok=True)
    path.write_text(_config(tmp_path, poll=poll))


def test_reload_with_an_invalid_config_keeps_the_running_one(tmp_path: Path) -> None:
    path = tmp_path / "imagesync.yaml"
    _write_config(path, tmp_path)
    d = Daemon(load_config(path), path)
    old = d.config
    path.write_text("stores:\n  a: {type: directory, pth: /x}\n")
    with capture_logs() as logs:
        assert d.reload() is False
    assert d.config is old
    (failed,) = [e for e in logs if e["event"] == "config.reload_failed"]
    assert str(path) in failed["error"] and "pth" in failed["error"]
    assert failed["log_level"] == "error"

    _write_config(path, tmp_path, poll="7s")
    with capture_logs() as logs:
        assert d.reload() is True
    assert d.config.poll_interval == 7.0
    assert any(e["event"] == "config.reloaded" for e in logs)


def test_a_reloaded_config_is_used_by_the_next_pass(tmp_path: Path) -> None:
    path = tmp_path / "imagesync.yaml"
    _write_config(path, tmp_path)
    built: list[Config] = []

    def factory(c: Config) -> Engine:
        built.append(c)
        return Engine(c)

    d = Daemon(load_config(path), path, engine_factory=factory)
    d.run_pass()
    d.run_pass()
    assert len(built) == 1  # sites and sessions are reused between passes
    _write_config(path, tmp_path, poll="9s")
    assert d.reload()
    d.run_pass()
    assert len(built) == 2 and built[1].poll_interval == 9.0


def test_health_follows_the_signs_of_life() -> None:
    clock = FakeClock(1000.0)
    health = Health(stall_seconds=5, clock=clock)

    def healthy(*, running: bool, scheduler: bool = True, poll: float = 60) -> bool:
        return health.healthy(scheduler_running=scheduler, pass_running=running, poll_interval=poll)

    assert healthy(running=False)
    assert not healthy(running=False, scheduler=False)  # no loop, no life
    clock.advance(4.9)  # a pass running, its last sign of life 4.9 s ago
    assert healthy(running=True)
    clock.advance(0.1)  # ... 5 s ago: stuck
    assert not healthy(running=True)
    health.beat()
    assert healthy(running=True)
    health.pass_ended()
    clock.advance(60 + 4.9)  # between passes: the next one is not overdue yet
    assert healthy(running=False)
    assert not healthy(running=False, poll=59)  # a shorter interval after a reload
    clock.advance(0.1)
    assert not healthy(running=False)


class Held:
    """An upload that stops before its first two chunks until the test lets it go on."""

    def __init__(self) -> None:
        self.reached = [threading.Event(), threading.Event()]
        self.go = [threading.Event(), threading.Event()]
        self.chunks = 0

    def __call__(self) -> None:
        i, self.chunks = self.chunks, self.chunks + 1
        if i < len(self.go):
            self.reached[i].set()
            assert self.go[i].wait(10)

    def release(self) -> None:
        for e in self.go:
            e.set()


def test_the_running_daemon_is_healthy_only_while_its_pass_shows_life(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    held = Held()
    sites: dict[str, MemorySite] = {"c1": MemorySite("c1"), "c2": HookSite("c2", held)}
    sites["c1"].add("img-a", os.urandom(5 * KB))
    d = daemon_for(tmp_path, sites, stall_seconds=5, clock=clock, notifier=Notifier(env={}))
    assert not d.healthy()  # no scheduler yet
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(d.run(install_signals=False)))
    runner.start()
    try:
        assert held.reached[0].wait(10), "the first pass did not start copying"
        assert d.healthy()
        clock.advance(5)  # the upload has been stuck for 5 s
        assert not d.healthy()
        held.go[0].set()  # one chunk goes through: a sign of life
        assert held.reached[1].wait(10)
        # the reader notices (a target's thread wrote) within a tick of its wait
        deadline = time.monotonic() + 10
        while not d.healthy() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.healthy()
        held.go[1].set()
        deadline = time.monotonic() + 10
        while d.last_report is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.last_report is not None and d.last_report.copied == 1
        assert d.healthy()  # idle, the next pass not due yet
        clock.advance(60 + 5)  # the next pass is long overdue
        assert not d.healthy()
    finally:
        held.release()
        d.request_stop()
        runner.join(timeout=10)
    assert codes == [0]
    assert not d.healthy()  # the scheduler is stopped


def test_the_watchdog_is_fed_only_while_healthy_and_complains_once() -> None:
    verdicts = [True, False, False, True, False]

    class Ticks(threading.Event):
        """``wait`` returns at once: one tick per verdict, then done."""

        def __init__(self) -> None:
            super().__init__()
            self.waited: list[float | None] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.waited.append(timeout)
            return len(self.waited) > len(verdicts)

    ticks, pings, asked = Ticks(), [], iter(verdicts)
    with capture_logs() as logs:
        feed_watchdog(30.0, ticks, lambda: next(asked), lambda: pings.append(1))
    assert len(pings) == 2 and ticks.waited == [30.0] * 6
    assert [e["event"] for e in logs] == ["watchdog.unhealthy"] * 2  # not once per tick


def test_metrics_after_a_pass(tmp_path: Path) -> None:
    sites = {n: MemorySite(n) for n in ("c1", "c2", "c3")}
    sites["c1"].add("img-a", os.urandom(5 * KB))
    sites["c3"].faults.fail_list = True  # c3 is down during this pass
    metrics = Metrics()
    d = daemon_for(tmp_path, sites, metrics=metrics)
    d.run_pass()
    text = metrics.exposition().decode()
    assert "imagesync_bytes_copied_total 5000.0" in text
    assert 'imagesync_copies_total{result="ok"} 1.0' in text
    assert 'imagesync_copies_total{result="failed"} 0.0' in text
    assert 'imagesync_sync_lag_seconds{image="img-a",site="c2"} 0.0' in text
    assert 'imagesync_sync_lag_seconds{image="img-a",site="c3"}' not in text  # cannot tell
    assert 'imagesync_last_successful_poll_timestamp_seconds{site="c1"}' in text
    assert 'imagesync_last_successful_poll_timestamp_seconds{site="c3"}' not in text
    assert "imagesync_transfers_in_flight 0.0" in text
    assert 'imagesync_passes_total{result="ok"} 1.0' in text

    # c3 back, with an older copy missing: its lag is the age of the newest version
    sites["c3"].faults.fail_list = False
    sites["c1"].faults.fail_list = True
    sites["c2"].faults.fail_list = False
    d.run_pass()
    text = metrics.exposition().decode()
    lag = [
        line
        for line in text.splitlines()
        if line.startswith('imagesync_sync_lag_seconds{image="img-a",site="c3"}')
    ]
    assert lag and float(lag[0].split()[-1]) == 0.0  # copied from c2 in that pass


def test_lag_of_a_site_that_cannot_be_served_grows(tmp_path: Path) -> None:
    sites = {n: MemorySite(n) for n in ("c1", "c2")}
    from datetime import UTC, datetime, timedelta

    sites["c1"].add("img-a", os.urandom(KB), created=datetime.now(UTC) - timedelta(hours=1))
    sites["c2"].faults.fail_write_after = 0
    sites["c2"].faults.fail_write_times = 99
    sites["c2"].faults.fail_write_transient = False
    metrics = Metrics()
    d = daemon_for(tmp_path, sites, metrics=metrics)
    report = d.run_pass()
    assert report is not None and report.failed == 1 and not report.ok
    text = metrics.exposition().decode()
    (line,) = [
        x
        for x in text.splitlines()
        if x.startswith('imagesync_sync_lag_seconds{image="img-a",site="c2"}')
    ]
    assert 3590 < float(line.split()[-1]) < 3700
    assert 'imagesync_copies_total{result="failed"} 1.0' in text


def test_metrics_are_served_over_http(tmp_path: Path) -> None:
    metrics = Metrics()
    host, port = metrics.serve("127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    finally:
        metrics.close()
    for name in (
        "imagesync_bytes_copied_total",
        "imagesync_copies_total",
        "imagesync_transfers_in_flight",
        "imagesync_sync_lag_seconds",
        "imagesync_last_successful_poll_timestamp_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in body


def test_two_daemons_in_one_process_do_not_share_metrics() -> None:
    a, b = Metrics(), Metrics()
    a.bytes_copied.inc(5)
    assert "imagesync_bytes_copied_total 0.0" in b.exposition().decode()


@pytest.mark.parametrize("busy", [True, False])
def test_a_copy_busy_in_another_process_is_not_a_failure(tmp_path: Path, busy: bool) -> None:
    sites = {n: MemorySite(n) for n in ("c1", "c2")}
    sites["c1"].add("img-a", os.urandom(KB))
    d = daemon_for(tmp_path, sites)
    other = State(tmp_path / "state")
    if busy:
        with other.lock("img-a", "c2"):
            report = d.run_pass()
    else:
        report = d.run_pass()
    assert report is not None and report.ok and report.copied == (0 if busy else 1)


def test_an_unreachable_site_is_one_log_line_per_pass_not_one_per_image(tmp_path: Path) -> None:
    sites = {n: MemorySite(n) for n in ("c1", "c2")}
    for i in range(5):
        sites["c1"].add(f"img-{i}", os.urandom(KB))
    sites["c2"].faults.fail_list = True
    d = daemon_for(tmp_path, sites)
    with capture_logs() as logs:
        report = d.run_pass()
    assert report is not None and report.unreachable == ("c2",)
    skips = [e for e in logs if e["event"] == "skip"]
    assert skips == [
        {
            "event": "skip",
            "site": "c2",
            "images": 5,
            "reason": "site unreachable",
            "log_level": "warning",
        }
    ]
    assert "unreachable: c2" in report.status()
