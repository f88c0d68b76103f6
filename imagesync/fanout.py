"""The fan-out of one copy: one read of the source handed to N targets, each through a bounded
queue of its own written by a thread of its own (``Feed``), so a slow target blocks only its
queue. A target that falls behind (it held the reader back, its queue full while another
target had nothing left to write, for ``Tuning.detach_after``: see ``Lag``) is *detached*:
from then on the read is also written to a spool on local disk (``imagesync.spool``, in a
room of the scratch directory, ``Tuning.spool_room``), and each detached target reads it from
the offset it reached, at its own pace, by a reader of its own (``LaterRead`` over the
spool): the source is read once. Without room for a spool, the detached targets share one
second read of the source (``LaterRead`` over the source), from the offset the first of them
reached: the source is read at most twice per copy. A target that ``Tuning.paces`` knows to
be much slower than the others is detached from offset 0.
``imagesync.transfer`` drives it (hashing, verifying, publishing).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence

import structlog

from imagesync.errors import Cancelled, SiteError, TransientError
from imagesync.model import ImageRecord
from imagesync.reading import read_from
from imagesync.sites.base import Site
from imagesync.spool import Spool
from imagesync.uploads import (
    CopyResult,
    ErrorKind,
    Live,
    Progress,
    Tuning,
    cancel_rest,
    check_cancel,
    fail,
    kind_of,
)

# the copy's events keep the logger they always had
log = structlog.get_logger("imagesync.transfer")


#: what a reader of the spool hands its target at a time. Its chunks are its own (a chunk of
#: the first read is one bytes object shared by every queue), so each target it serves holds
#: its queue's and its upload's queue's worth: with a quarter of the first read's 1 MiB, the
#: 200 MiB fan-out of bench_network.py (two targets on the spool) peaked at 86-94 MB of RSS,
#: with 1 MiB at 101-106 MB (88 MB with the shared second read before the spool).
SPOOL_CHUNK = 256 << 10


class Stopped(Exception):
    """A read was told to stop (the copy is being given up)."""


class Feed:
    """One target's bounded queue of chunks and the thread that writes them to its upload, so
    that a slow target blocks only its own queue, and how far behind it is can be seen."""

    def __init__(self, live: Live, tuning: Tuning, cancel: threading.Event | None) -> None:
        self.live = live
        self.cancel = cancel
        self.tick = tuning.tick
        self.clock = tuning.clock
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=tuning.queue_chunks)
        self.sent = 0  # bytes queued for this target: where a second read takes it up
        self.written = 0  # bytes its upload took: signs of life (see FanOut.pulse)
        #: since when every hand-over to it found its queue full (None: it had room), and
        #: what it had written then
        self.full_since: float | None = None
        self.written_then = 0
        self.error: Exception | None = None
        #: when it started, and when it had written its last byte (None: not yet): its pace
        self.began = tuning.clock()
        self.done_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"feed-{live.site.name}")
        self.thread.start()

    def rate(self, now: float) -> float:
        """Bytes per second its upload has taken since it fell behind."""
        if self.full_since is None:
            return float("inf")
        return (self.written - self.written_then) / max(now - self.full_since, 1e-3)

    def _run(self) -> None:
        while (chunk := self.q.get()) is not None:
            if self.cancel is not None and self.cancel.is_set():
                return  # not one more chunk: whoever reads sees the cancel and aborts
            try:
                self.live.writer.write(chunk)
            except Exception as exc:
                self.error = exc
                return
            self.written += len(chunk)
        self.done_at = self.clock()

    def end(self, cancel: threading.Event | None, pulse: Callable[[], None]) -> Exception | None:
        """No more chunks: wait until every queued one is written; the write's failure."""
        while self.thread.is_alive():
            try:
                self.q.put(None, timeout=self.tick)
                break
            except queue.Full:
                check_cancel(cancel)
                pulse()
        while self.thread.is_alive():
            self.thread.join(timeout=self.tick)
            check_cancel(cancel)
            pulse()
        check_cancel(cancel)  # the thread may have stopped for it, with chunks left unwritten
        return self.error

    def stop(self) -> None:
        """Write no more (what is queued is dropped). Not waited for: the caller aborts the
        upload, which also ends a write blocked in a stuck one (whose failure is ignored)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.q.get_nowait()
        with contextlib.suppress(queue.Full):
            self.q.put_nowait(None)


class Lag:
    """Which target holds a read back, and for how long: the reader waited on its full queue
    while another target on the read had nothing left to write. Only that time counts, summed
    over the waits since it last had room: while every target is busy (the source or the
    machine is the slow part) nobody is held back, and a throttled link that takes a chunk now
    and then (each wait short, even shorter than ``Tuning.tick``) still adds up. A wait runs
    from ``began`` (the first hand-over that found the queue full) to the ``waited`` that ends
    it; one shorter than ``floor`` (``Tuning.short_wait``) does not count. The clock is
    injected (tests count)."""

    def __init__(self, grace: float, clock: Callable[[], float], floor: float = 0.0) -> None:
        self.grace, self.clock, self.floor = grace, clock, floor
        self._held: dict[int, float] = {}  # per feed: seconds it held the others back
        self._last: dict[int, float] = {}  # per feed: when the reader last looked at it
        self._began: dict[int, float] = {}  # per feed: when the wait under way began

    def began(self, feed: object) -> None:
        """The reader found ``feed``'s queue full: a wait starts now (what went before it,
        handing the chunk to the others and reading the next one, is not a wait)."""
        self._last[id(feed)] = self._began[id(feed)] = self.clock()

    def waited(self, feed: object, starved: bool) -> bool:
        """The reader waited once more on ``feed``'s full queue (``starved``: another target
        had nothing left meanwhile). True when it has held the others back for the grace."""
        key, now = id(feed), self.clock()
        last = self._last.get(key)
        self._last[key] = now
        # a wait shorter than the floor is the jitter of targets sharing a machine
        long_enough = now - self._began.get(key, now) >= self.floor
        if last is not None and starved and long_enough:
            self._held[key] = self._held.get(key, 0.0) + (now - last)
        return self._held.get(key, 0.0) >= self.grace

    def room(self, feed: object) -> None:
        """It had room for a chunk without the reader waiting: not behind (any more)."""
        self._held.pop(id(feed), None)
        self._last.pop(id(feed), None)
        self._began.pop(id(feed), None)


class Read:
    """One read of the source and the feeds it hands each chunk to, at ``pos``."""

    def __init__(self, tuning: Tuning, cancel: threading.Event | None, start: int = 0) -> None:
        self.tuning = tuning
        self.cancel = cancel
        self.pos = start  # offset of the next chunk
        self.feeds: list[Feed] = []
        self.lock = threading.Lock()  # feeds may join from another thread (the first read)
        self.stopped = threading.Event()
        self.lag = Lag(tuning.detach_after, tuning.clock, tuning.short_wait)

    def hand(
        self,
        chunk: bytes,
        detach: Callable[[Feed], bool] | None = None,
        pulse: Callable[[], None] = lambda: None,
    ) -> None:
        with self.lock:
            start, feeds = self.pos, list(self.feeds)
            self.pos += len(chunk)
        for feed in feeds:
            if feed.sent >= start + len(chunk):
                continue  # joined ahead of this read: it has these bytes already
            data = chunk[feed.sent - start :] if feed.sent > start else chunk
            if not self._put(feed, data, detach, pulse):
                with self.lock:
                    self.feeds.remove(feed)

    def _put(
        self,
        feed: Feed,
        data: bytes,
        detach: Callable[[Feed], bool] | None,
        pulse: Callable[[], None],
    ) -> bool:
        """Queue ``data`` for one target, waiting while its queue is full; False when the
        target left this read (its upload failed, or ``detach`` took it)."""
        waited = False
        while True:
            if feed.error is not None:
                feed.stop()
                fail(feed.live, feed.error, kind_of(feed.error))
                return False
            try:
                # first without waiting, so that a wait shorter than the tick (a fast but
                # throttled link freeing a slot every few ms) is seen as one and adds up
                feed.q.put(data, block=waited, timeout=self.tuning.tick if waited else None)
            except queue.Full:
                if not waited and detach is not None:
                    self.lag.began(feed)
                waited = True
            else:
                feed.sent += len(data)
                if not waited:
                    feed.full_since = None  # it had room: not behind
                    self.lag.room(feed)
                elif detach is not None:  # the wait that just ended counts too
                    self.lag.waited(feed, self._starved(feed))
                return True
            check_cancel(self.cancel)
            pulse()
            if self.stopped.is_set():
                raise Stopped
            if detach is None:
                continue
            if feed.full_since is None:  # its rate from here on (LaterRead.take)
                feed.full_since, feed.written_then = self.tuning.clock(), feed.written
            if self.lag.waited(feed, self._starved(feed)) and detach(feed):
                return False

    def _starved(self, feed: Feed) -> bool:
        """Has another target on this read nothing left to write (while ``feed`` is full)?"""
        return any(f.q.empty() for f in self.feeds if f is not feed)

    def drain(self, pulse: Callable[[], None]) -> list[Live]:
        """The read is over: every target still on it writes what is queued; those whose
        upload failed fail. Returns the others."""
        with self.lock:
            feeds = list(self.feeds)
        for feed in feeds:
            err = feed.end(self.cancel, pulse)  # Cancelled: stop_feeds() still finds the rest
            if err is not None:
                with self.lock:
                    self.feeds.remove(feed)
                fail(feed.live, err, kind_of(err))
        return self.stop_feeds()  # every thread has ended: only takes them off this read

    def stop_feeds(self) -> list[Live]:
        """Stop every target's writing (not aborted yet): their uploads."""
        with self.lock:
            feeds, self.feeds = self.feeds, []
        for feed in feeds:
            feed.stop()
        return [f.live for f in feeds]


class LaterRead(Read):
    """A read serving targets that fell behind, in a thread of its own: the second read of the
    source, from the offset the first of them reached (0 for those known to be slow), which
    others join if it has not passed their offset yet; or one target's own read of the spool
    (``spooled``: it serves that target alone, at its pace)."""

    def __init__(self, fan: FanOut, first: Sequence[Feed], spooled: Spool | None = None) -> None:
        super().__init__(fan.tuning, fan.cancel, start=first[0].sent)
        self.start, self.t0 = first[0].sent, fan.tuning.clock()
        self.source, self.image = fan.source, fan.image
        self.spooled = spooled
        self.feeds.extend(first)
        self.note_paces = fan.note_paces
        self.closed = False  # takes no more targets (a spool's reader takes none)
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(fan.count,), daemon=True, name=f"read-{first[0].live.site.name}"
        )
        self.thread.start()

    def take(self, feed: Feed) -> bool:
        """Serve ``feed`` too, if this read has not passed its offset and goes about as fast
        (a target twice as fast as the slow ones here is better off held a little on the
        first read than held to their pace)."""
        now = self.tuning.clock()
        with self.lock:
            rate = (self.pos - self.start) / max(now - self.t0, 1e-3)
            if self.spooled or self.closed or self.pos > feed.sent or feed.rate(now) > 2 * rate:
                return False
            self.feeds.append(feed)
            return True

    def _stream(self, count: Callable[[bool], None]) -> Generator[bytes, None, None]:
        if self.spooled is None:
            return read_from(self.source, self.image, self.pos, self.tuning, count)
        return self.spooled.chunks(self.pos, self._stopping, self.tuning.tick)

    def _stopping(self) -> bool:
        return self.stopped.is_set() or (self.cancel is not None and self.cancel.is_set())

    def _run(self, count: Callable[[bool], None]) -> None:
        stream = self._stream(count)
        try:
            for chunk in stream:
                check_cancel(self.cancel)
                if self.stopped.is_set():
                    return
                self.hand(chunk)
                with self.lock:
                    if not self.feeds:  # every target on it failed
                        self.closed = True
                        return
            check_cancel(self.cancel)  # a spool's reader returns early when cancelled
        except BaseException as exc:
            self.error = exc
        finally:
            with self.lock:
                self.closed = True
            stream.close()

    def wait(self, pulse: Callable[[], None]) -> list[Live]:
        """The targets this read gave every byte to, once it is over (those it failed are
        failed: a source that failed them fails them as ``source``, retried alone)."""
        while self.thread.is_alive():
            self.thread.join(timeout=self.tuning.tick)
            pulse()
        if self.error is None:
            done = self.drain(pulse)
            self.note_paces()
            return done
        live = self.stop_feeds()
        if isinstance(self.error, Cancelled):
            cancel_rest(live)
        elif isinstance(self.error, SiteError):
            err = TransientError(
                f"reading {self.image.ref} from offset {self.pos}: {self.error}",
                site=self.source.name,
            )
            for lv in live:
                fail(lv, err, ErrorKind.SOURCE)
        else:
            log.error("copy.source_failed", source=self.image.ref, exc_info=self.error)
            for lv in live:
                fail(lv, self.error, ErrorKind.UNEXPECTED)
        return []

    def stop(self) -> list[Live]:
        self.stopped.set()
        self.thread.join()
        return self.stop_feeds()


class FanOut:
    """The targets of one attempt: those on the first read of the source, and the reads that
    those which fell behind were detached onto: each its own read of the spool when there is
    room for one (``Tuning.spool_room``), else one second read of the source (two reads per
    copy at most)."""

    def __init__(
        self,
        source: Site,
        image: ImageRecord,
        live: Sequence[Live],
        tuning: Tuning,
        cancel: threading.Event | None,
        result: CopyResult,
        progress: Progress | None = None,
    ) -> None:
        self.source, self.image, self.tuning, self.cancel = source, image, tuning, cancel
        self.result = result
        self.first = Read(tuning, cancel)
        self._feeds = [Feed(lv, tuning, cancel) for lv in live]  # detached ones too
        self.second: LaterRead | None = None  # of the source
        self.spooled: list[LaterRead] = []  # of the spool, one per target
        self.spool: Spool | None = None
        self._spool_tried = False  # a spool is opened at most once (it may get no room)
        self._resources = contextlib.ExitStack()  # the spool's file and scratch room
        self._at = 0  # offset of the chunk the first read is handing over
        self.ready: list[Live] = []  # set by end(): every byte written, from the first read
        self._count_lock = threading.Lock()
        self.progress = progress
        self._written = 0
        self._noted: set[Feed] = set()  # whose pace was told
        # Known to be much slower than the others: on a read of their own from the start, so
        # the others never wait for them (not even the grace it takes to see them fall behind).
        slow = set(
            tuning.paces.slower([lv.site.name for lv in live], tuning.slower_than)
            if tuning.paces is not None and len(live) > 1
            else []
        )
        self.first.feeds = [f for f in self._feeds if f.live.site.name not in slow]
        late = [f for f in self._feeds if f.live.site.name in slow]
        if late and self._open_spool() is not None:
            for f in late:
                self._detach_to_spool(f, known_slow=True)
        elif late:
            self.second = LaterRead(self, late)
            for f in late:
                result.detached.append(f.live.site.name)
                log.info("copy.detached", site=f.live.site.name, offset=0, known_slow=True)

    @property
    def later(self) -> list[LaterRead]:
        """The reads serving detached targets."""
        return ([self.second] if self.second is not None else []) + self.spooled

    def pulse(self) -> None:
        """A sign of life while the reader waits for its targets: ``progress(0)`` when an upload
        took bytes since the last call. Only from the copy's own thread (the daemon's health
        and status page follow the thread that reads the source)."""
        written = sum(f.written for f in self._feeds)
        if written != self._written and self.progress is not None:
            self._written = written
            self.progress(0)

    def count(self, resumed: bool) -> None:
        with self._count_lock:
            self.result.reads += not resumed
            self.result.resumes += resumed

    @property
    def busy(self) -> bool:
        """Is any target still being served (the first read must go on, to hash for them and
        fill the spool)?"""
        return bool(self.first.feeds) or any(not r.closed for r in self.later)

    def hand(self, chunk: bytes) -> None:
        self._at = self.first.pos
        self.first.hand(chunk, self._detach, self.pulse)
        if self.spool is not None:  # after: a target detached meanwhile reads it from here
            self.spool.append(chunk)

    def _open_spool(self) -> Spool | None:
        """The spool, from the chunk being handed over on (None: no room for it, see
        ``Tuning.spool_room``; the image's size is unknown)."""
        if self.spool is not None or self._spool_tried:
            return self.spool
        self._spool_tried = True
        room = self.tuning.spool_room
        if room is None or self.image.size is None:
            return None
        try:
            where = self._resources.enter_context(room(self.image.size - self._at))
            if where is None:
                return None
            self.spool = Spool(where, self._at, SPOOL_CHUNK)
        except OSError as exc:  # the scratch directory cannot be made or written
            log.warning("copy.no_spool", error=str(exc), then="a second read of the source")
            return None
        self._resources.callback(self.spool.close)
        return self.spool

    def _detach_to_spool(self, feed: Feed, known_slow: bool = False) -> None:
        self.spooled.append(LaterRead(self, [feed], self.spool))
        self.result.detached.append(feed.live.site.name)
        log.info(
            "copy.detached",
            site=feed.live.site.name,
            offset=feed.sent,
            spool=True,
            **({"known_slow": True} if known_slow else {}),
        )

    def _detach(self, feed: Feed) -> bool:
        if self._open_spool() is not None:
            self._detach_to_spool(feed)  # its own read: every target keeps its own pace
            return True
        if self.second is None:
            if any(f.written < feed.written for f in self.first.feeds):
                # another is further behind: it is the one to move (a target merely slower
                # than the fastest would take the second read and be held to the slowest's
                # pace there when that one joins it)
                return False
            self.second = LaterRead(self, [feed])
        elif not self.second.take(feed):
            return False  # the second read is past it: it stays on the first
        self.result.detached.append(feed.live.site.name)
        log.info("copy.detached", site=feed.live.site.name, offset=feed.sent)
        return True

    def end(self) -> None:
        if self.spool is not None:
            self.spool.finish()
        self.ready = self.first.drain(self.pulse)
        self.note_paces()

    def note_paces(self) -> None:
        """Tell ``Tuning.paces`` how fast each target that has taken every byte took them
        (once each: called when the first read and when each later read is over)."""
        paces = self.tuning.paces
        if paces is None:
            return
        for f in self._feeds:
            if f.done_at is None or f.error is not None or f in self._noted:
                continue
            self._noted.add(f)
            if f.written >= self.tuning.pace_min_bytes:
                paces.note(f.live.site.name, f.written, f.done_at - f.began)

    def finished_later(self) -> Iterator[list[Live]]:
        """The targets each later read gave every byte to, as each read ends (a fast one's
        need not wait for a slow one's), once the first read is over."""
        pending = self.later
        while pending:
            done = next((r for r in pending if not r.thread.is_alive()), None)
            if done is None:
                pending[0].thread.join(timeout=self.tuning.tick)
                self.pulse()
                continue
            pending.remove(done)
            yield done.wait(self.pulse)

    def stop_later(self) -> list[Live]:
        """Stop the later reads; the uploads they were writing (not aborted yet)."""
        return [lv for r in self.later for lv in r.stop()]

    def abort_all(self) -> list[Live]:
        """Give up: abort every upload still being written or waiting to be settled."""
        live = self.first.stop_feeds() + self.ready + self.stop_later()
        self.ready = []
        for lv in live:
            lv.abort()
        return live

    def close(self) -> None:
        """The attempt is over: stop any read still going (their targets were settled, or
        are aborted by the caller) and remove the spool."""
        for r in self.later:
            r.stopped.set()
            r.thread.join()
        self._resources.close()
