"""The fan-out on real networks: a target that falls behind is detached onto a second read of
the source (fast targets publish first), and a cut source read resumes from its offset.

In-memory sites; a slow target is one whose writes are held on an event, opened only when the
fast targets have published (told by the upload watcher), so every assertion is about order
and counts, never about time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from imagesync.errors import TransientError
from imagesync.fanout import FanOut, Lag
from imagesync.model import ImageRecord
from imagesync.retry import RetryPolicy
from imagesync.sites.memory import Faults, MemorySite
from imagesync.transfer import CopyResult, Tuning, copy_image, new_image_for
from imagesync.uploads import Live, NoWatcher, Paces, TargetResult, UploadWatcher

DATA = os.urandom(250_000)  # 250 chunks of the memory site's 1000 bytes
FAST = RetryPolicy(attempts=3, base=0.0, cap=0.0)
QUICK = Tuning(queue_chunks=2, detach_after=0.01, tick=0.002)
HOLD = 10.0  # seconds a held target waits at most (only code without detaching waits it out)


class _Source(MemorySite):
    """Records the offset of every read; ``cut_at``: offsets at which a read is cut (once
    each), as a dropped connection (a TransientError mid-stream)."""

    def __init__(self, name: str, cut_at: tuple[int, ...] = ()) -> None:
        super().__init__(name)
        self.offsets: list[int] = []
        self.cuts = list(cut_at)
        self.served = 0  # bytes handed out, over every read

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        self.offsets.append(offset)
        return self._cut(super().open(image, offset), offset)

    def _cut(self, chunks: Iterator[bytes], pos: int) -> Iterator[bytes]:
        for chunk in chunks:
            if self.cuts and pos + len(chunk) > self.cuts[0]:
                keep = self.cuts.pop(0) - pos
                self.served += keep
                yield chunk[:keep]
                raise TransientError("connection reset by peer", site=self.name)
            pos += len(chunk)
            self.served += len(chunk)
            yield chunk


class _Order:
    """An UploadWatcher noting uploads ended (published), in order; opens ``gate`` once every
    site in ``fast`` has published."""

    def __init__(self, fast: set[str]) -> None:
        self.fast = fast
        self.order: list[str] = []
        self.gate = threading.Event()

    def started(self, site: str, image_id: str) -> None:
        pass

    def ended(self, site: str, image_id: str) -> None:
        self.order.append(site)
        if self.fast <= set(self.order):
            self.gate.set()


def _held(name: str, after_chunks: int, gate: threading.Event) -> MemorySite:
    """A target whose writes stop after ``after_chunks`` chunks until ``gate`` opens."""
    writes = 0

    def hook(op: str, image_id: str | None) -> None:
        nonlocal writes
        if op == "write":
            writes += 1
            if writes == after_chunks:
                gate.wait(HOLD)

    return MemorySite(name, Faults(hook=hook))


def _copy(
    src: MemorySite,
    targets: list[MemorySite],
    watcher: UploadWatcher | None = None,
    tuning: Tuning = QUICK,
    **kw: Any,
) -> tuple[ImageRecord, CopyResult]:
    """DATA as an image on ``src``, copied to ``targets``; ``kw``: copy_image's other keywords
    (``policy`` is FAST unless given)."""
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    kw.setdefault("policy", FAST)
    result = copy_image(
        src,
        rec,
        [(t, new) for t in targets],
        sleep=lambda s: None,
        watcher=watcher,
        tuning=tuning,
        **kw,
    )
    return rec, result


def _holds(site: MemorySite) -> bytes:
    (stored,) = site.images.values()
    assert stored.published
    return bytes(stored.data)


def test_a_slow_target_is_detached_and_the_fast_ones_publish_first() -> None:
    order = _Order({"fast1", "fast2"})
    slow = _held("slow", 20, order.gate)
    src = _Source("src")
    fast = [MemorySite("fast1"), MemorySite("fast2")]
    _, result = _copy(src, [slow, *fast], order)
    assert result.ok
    assert order.order[-1] == "slow"  # listed first, published last: it held no one back
    assert result.detached == ["slow"]
    # read twice: the second from where the slow target had got to, not from the start
    assert len(src.offsets) == 2 and src.offsets[0] == 0
    assert 20_000 <= src.offsets[1] < len(DATA)
    assert result.reads == 2 and result.resumes == 0
    assert all(_holds(t) == DATA for t in [slow, *fast])


def test_two_slow_targets_share_the_one_second_read() -> None:
    order = _Order({"fast"})
    slow1, slow2 = _held("slow1", 20, order.gate), _held("slow2", 60, order.gate)
    src = _Source("src")
    fast = MemorySite("fast")
    _, result = _copy(src, [slow1, slow2, fast], order)
    assert result.ok
    assert order.order[0] == "fast"
    assert sorted(result.detached) == ["slow1", "slow2"]
    assert len(src.offsets) == 2  # never a third read
    assert all(_holds(t) == DATA for t in [slow1, slow2, fast])


def test_targets_keeping_pace_stay_on_the_one_read() -> None:
    src = _Source("src")
    targets = [MemorySite(f"t{i}") for i in range(3)]
    _, result = _copy(src, targets)
    assert result.ok and src.offsets == [0] and result.detached == []


def test_a_cut_source_read_resumes_from_its_offset_without_restarting_targets() -> None:
    cuts = (len(DATA) // 2, len(DATA) * 9 // 10)
    src = _Source("src", cut_at=cuts)
    targets = [MemorySite("t1"), MemorySite("t2")]
    _, result = _copy(src, targets)
    assert result.ok
    assert src.offsets == [0, *cuts]  # resumed where each cut struck, never from 0
    assert result.reads == 1 and result.resumes == 2
    assert src.served == len(DATA)  # every byte read once
    assert all(t.attempts == 1 for t in result.targets)
    assert all(_holds(t) == DATA for t in targets)


def test_resumes_are_bounded() -> None:
    src = _Source("src", cut_at=tuple(range(10_000, 250_000, 10_000)))
    targets = [MemorySite("t1")]
    _, result = _copy(src, targets, policy=RetryPolicy(attempts=1, base=0.0, cap=0.0))
    assert not result.ok and result.targets[0].error_kind == "transient"
    assert len(src.offsets) == 1 + QUICK.resumes
    assert targets[0].images == {}


def test_a_source_that_changed_is_not_resumed() -> None:
    src = _Source("src", cut_at=(100_000,))
    rec = src.add("img", DATA)

    def rewrite(op: str, image_id: str | None) -> None:
        if op == "get_image":  # asked before resuming: a person replaced the data meanwhile
            stored = src.images[rec.id]
            stored.rec = stored.rec.with_(size=len(DATA) + 1)

    src.faults.hook = rewrite
    target = MemorySite("t1")
    new = new_image_for(rec, rec.version, "private")
    result = copy_image(
        src,
        rec,
        [(target, new)],
        policy=RetryPolicy(attempts=1, base=0.0, cap=0.0),
        sleep=lambda s: None,
        tuning=QUICK,
    )
    assert not result.ok
    assert "changed while it was read (size)" in (result.targets[0].error or "")
    assert src.offsets == [0] and target.images == {}


def test_a_failed_second_read_fails_only_the_detached_target_which_is_retried_alone() -> None:
    order = _Order({"fast"})
    slow = _held("slow", 20, order.gate)
    src = _Source("src")
    fast = MemorySite("fast")
    rec = src.add("img", DATA)
    opens = 0
    refusals = 2  # the second read's open, then the check before its resume: it gives up

    def refuse_the_second_read(op: str, image_id: str | None) -> None:
        nonlocal opens, refusals
        opens += op == "open"
        if opens >= 2 and refusals and op in ("open", "get_image"):
            refusals -= 1
            raise OSError("connection refused")

    src.faults.hook = refuse_the_second_read
    new = new_image_for(rec, rec.version, "private")
    result = copy_image(
        src,
        rec,
        [(slow, new), (fast, new)],
        policy=FAST,
        sleep=lambda s: None,
        watcher=order,
        tuning=QUICK,
    )
    by_site = {t.site: t for t in result.targets}
    assert result.ok
    assert by_site["fast"].attempts == 1  # not re-sent for the slow one's failed read
    assert by_site["slow"].attempts == 2  # re-sent alone, from a fresh read
    assert src.offsets[0] == 0 and src.offsets[-1] == 0 and len(src.offsets) == 3
    assert _holds(fast) == DATA and _holds(slow) == DATA


def test_a_write_stuck_at_cancel_is_aborted_and_the_copy_returns() -> None:
    """A write that neither moves nor fails no longer holds the copy: the reader sees the
    cancel, aborts the upload (which ends a real stuck one) and returns."""
    stuck_gate = threading.Event()  # opened only after the copy returned
    cancel = threading.Event()

    writing = threading.Event()

    def hook(op: str, image_id: str | None) -> None:
        if op == "write":
            writing.set()
            cancel.set()  # SIGTERM arrives while this write hangs
            stuck_gate.wait(HOLD)
            writing.clear()

    stuck = MemorySite("stuck", Faults(hook=hook))
    src = MemorySite("src")
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    result = copy_image(src, rec, [(stuck, new)], cancel=cancel, tuning=QUICK)
    returned_while_stuck = writing.is_set()
    stuck_gate.set()
    assert returned_while_stuck
    assert result.cancelled and stuck.images == {}


class _Ticks:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_the_time_a_target_holds_another_back_counts_towards_detaching_it() -> None:
    clock = _Ticks()
    lag, slow = Lag(grace=0.2, clock=clock), object()
    assert not lag.waited(slow, starved=False)
    for _ in range(10):  # a second of waiting while every target was busy: nobody held back
        clock.now += 0.1
        assert not lag.waited(slow, starved=False)
    clock.now += 0.1
    assert not lag.waited(slow, starved=True)  # 0.1 s of holding another back
    clock.now += 0.1
    assert lag.waited(slow, starved=True)  # 0.2 s: behind


def test_a_target_that_had_room_starts_its_grace_again() -> None:
    clock = _Ticks()
    lag, feed, other = Lag(grace=0.2, clock=clock), object(), object()
    lag.waited(feed, starved=True)
    clock.now += 0.15
    assert not lag.waited(feed, starved=True)
    lag.room(feed)  # took a chunk without the reader waiting
    clock.now += 0.15
    assert not lag.waited(feed, starved=True)  # counted afresh from here
    assert not lag.waited(other, starved=True)  # and each target apart
    clock.now += 0.2
    assert lag.waited(feed, starved=True) and not lag.waited(other, starved=False)


def test_paces_name_the_targets_known_to_be_much_slower_than_the_others() -> None:
    paces = Paces()
    paces.note("store", 400 * 2**20, 2.0)  # 200 MiB/s
    paces.note("cloud", 200 * 2**20, 4.0)  # 50 MiB/s: slower, not much slower than the store?
    paces.note("far", 200 * 2**20, 20.0)  # 10 MiB/s
    assert paces.slower(["store", "cloud", "far"], factor=3.0) == ["cloud", "far"]
    assert paces.slower(["cloud", "far"], factor=3.0) == ["far"]
    assert paces.slower(["cloud", "far", "unknown"], factor=6.0) == []
    assert paces.slower(["far"], factor=3.0) == []  # alone: slower than no one
    paces.note("far", 200 * 2**20, 2.0)  # one fast copy moves it half-way: 55 MiB/s
    assert paces.slower(["cloud", "far"], factor=3.0) == []


def test_a_target_known_to_be_slow_gets_its_own_read_from_the_start() -> None:
    paces = Paces()
    paces.note("slow", 1_000_000, 10.0)
    paces.note("fast1", 1_000_000, 1.0)
    order = _Order({"fast1", "fast2"})
    slow = _held("slow", 5, order.gate)  # it would hold the reader from its 5th chunk on
    src = _Source("src")
    fast = [MemorySite("fast1"), MemorySite("fast2")]
    # the fast ones must publish without the slow one ever being seen to fall behind
    never = Tuning(queue_chunks=2, detach_after=HOLD * 10, tick=0.002, paces=paces)
    _, result = _copy(src, [slow, *fast], order, tuning=never)
    assert result.ok and order.order[-1] == "slow"
    assert result.detached == ["slow"]
    assert sorted(src.offsets) == [0, 0] and result.reads == 2  # both reads from the start
    assert src.served == 2 * len(DATA)
    assert all(_holds(t) == DATA for t in [slow, *fast])


def test_a_copy_teaches_paces_each_target_s_speed_but_a_small_one_does_not() -> None:
    paces = Paces()
    targets = [MemorySite("t1"), MemorySite("t2")]
    _copy(_Source("src"), targets, tuning=Tuning(paces=paces))  # 250 kB: mostly latency
    assert paces.rate("t1") is None
    learn = Tuning(queue_chunks=2, tick=0.002, paces=paces, pace_min_bytes=len(DATA))
    _, result = _copy(_Source("src"), targets, tuning=learn)
    assert result.ok and all((paces.rate(t.name) or 0) > 0 for t in targets)


def test_the_first_target_detached_is_the_one_furthest_behind() -> None:
    """Of two targets holding the read back, the one merely slower than the fastest must not
    take the second read: the slowest would join it there and hold it to its pace."""
    src = MemorySite("src")
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    sites = [MemorySite("mid"), MemorySite("slow"), MemorySite("fast")]
    live = [Live(t, t.create(new), TargetResult(site=t.name), NoWatcher()) for t in sites]
    fan = FanOut(src, rec, live, QUICK, None, CopyResult(source=rec, version=rec.version))
    mid, slow, fast = fan.first.feeds
    try:
        mid.written, slow.written, fast.written = 40_000, 10_000, 90_000
        assert not fan._detach(mid)  # slow is further behind: mid stays on the first read
        assert fan.second is None
        assert fan._detach(slow) and fan.second is not None
        assert fan.result.detached == ["slow"]
    finally:
        fan.abort_all()


def _sipping(name: str, seconds: float) -> MemorySite:
    """A target on a link that takes a chunk every ``seconds``: slow, never stuck."""

    def sip(op: str, image_id: str | None) -> None:
        if op == "write":
            threading.Event().wait(seconds)

    return MemorySite(name, Faults(hook=sip))


def test_a_target_that_takes_each_chunk_within_a_tick_still_holds_the_others_back() -> None:
    """A link that frees a queue slot every few milliseconds (a throttled but fast one, each
    hand-over shorter than the tick the reader looks at lag by) makes the reader wait on it
    chunk after chunk: that time adds up, and it is detached like a slower one."""
    slow, fast = _sipping("slow", 0.005), MemorySite("fast")
    # a tick far longer than the slow target's wait per chunk: each timed put succeeds
    patient = Tuning(queue_chunks=2, detach_after=0.05, tick=1.0, short_wait=0.002)
    _, result = _copy(_Source("src"), [slow, fast], tuning=patient)
    assert result.ok and result.detached == ["slow"]
    assert all(_holds(t) == DATA for t in (slow, fast))


def test_waits_shorter_than_the_floor_do_not_count() -> None:
    """The same target, when waits of its few milliseconds are below the floor: the jitter of
    targets sharing a machine, not a slow link. It is never detached."""
    slow, fast = _sipping("slow", 0.005), MemorySite("fast")
    floor = Tuning(queue_chunks=2, detach_after=0.05, tick=1.0, short_wait=0.05)
    _, result = _copy(_Source("src"), [slow, fast], tuning=floor)
    assert result.ok and result.detached == [] and result.reads == 1
    assert all(_holds(t) == DATA for t in (slow, fast))
