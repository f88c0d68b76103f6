"""Streaming copy: one reader, N writers, hashing on the fly, verify, publish or clean up.

The source is read once; each chunk is hashed (sha512; md5 too when a side lacks sha512)
and handed to every live target through a bounded queue of its own (a thread per target writes
from it), so memory does not grow with image size. A target that falls behind (its queue full
for ``Tuning.detach_after`` while another target waits for data) is *detached*: it is served
from then on by a second read of the source from the offset it reached (``Site.open(image,
offset)``: Range), shared by every target detached later, so fast targets finish and publish at
their own speed; the source is read at most twice per copy. A read that is cut mid-stream
resumes from where it stopped (``Tuning.resumes`` times per read), after checking that the
source is still the same image (size, hashes, version), while the uploads keep streaming from
their queues. When the stream ends the digests are compared with everything the source claimed (its
own hashes, size, provenance) and with what each target reports it stored. A target that
fails or mismatches is deleted (nothing half-made is left) while the others carry on; only
verified copies are published, with the provenance marks (``imagesync.origin``,
``.version``, ``.sha512``).

Transient failures are retried with the shared policy (``retry.py``): a failed target alone
is re-sent from a fresh read of the source; a source read that failed beyond its resumes
retries every target it served. The bytes a detached target got from the second read are not
hashed again: what it stored is compared with the digests of the first, whole read.

One target never takes the others down: any exception a target's site raises while creating,
writing, finishing or publishing (a ``SiteError``, or a bug outside the hierarchy, which counts
as ``ErrorKind.UNEXPECTED`` and is logged with its traceback) fails that target alone, which is
aborted or deleted, while every other target is still finished or aborted (a Glance writer's
upload thread waits for one or the other). ``abort`` that fails anyway leaves the upload
leased, for recovery to remove.

A copy can be cancelled (the daemon on SIGTERM): ``cancel`` is checked between chunks, and
every target still being written is aborted, so a cancelled copy leaves nothing behind.
An :class:`UploadWatcher` hears of each upload from its creation until it is published or
removed; the engine records these as leases (what this process has half-made, where).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import structlog

from imagesync.errors import Cancelled, IntegrityError, NotFound, SiteError, TransientError
from imagesync.hashing import MultiHasher
from imagesync.model import (
    PROP_ORIGIN,
    PROP_SHA512,
    PROP_VERSION,
    ImageRecord,
    NewImage,
    Version,
    format_time,
    hashes_agree,
)
from imagesync.retry import RetryPolicy
from imagesync.sites.base import Site, Writer

log = structlog.get_logger("imagesync.transfer")

Progress = Callable[[int], None]


class ErrorKind(StrEnum):
    """Why a target did not get its copy. The values are what history records."""

    INTEGRITY = "integrity"  # bytes did not match: the copy was removed
    TRANSIENT = "transient"  # worth retrying (network, 5xx)
    SITE = "site"  # the target refused (auth, quota, bad request)
    SOURCE = "source"  # reading the source failed
    CANCELLED = "cancelled"  # the daemon is stopping: the upload was removed
    BUSY = "busy"  # another imagesync holds the (name, site) lock
    CONVERSION = "conversion"  # the disk format conversion failed (imagesync.convert)
    UNEXPECTED = "unexpected"  # a bug: logged with its traceback

    @property
    def counts_as_failure(self) -> bool:
        """Busy (someone else is on it) and cancelled (we are stopping) are not failures."""
        return self not in (ErrorKind.BUSY, ErrorKind.CANCELLED)

    @property
    def retryable(self) -> bool:
        return self in (ErrorKind.TRANSIENT, ErrorKind.SOURCE)


class UploadWatcher(Protocol):
    """Told when an upload starts on a site and when it is published or removed."""

    def started(self, site: str, image_id: str) -> None: ...

    def ended(self, site: str, image_id: str) -> None: ...


class _NoWatcher:
    def started(self, site: str, image_id: str) -> None:
        pass

    def ended(self, site: str, image_id: str) -> None:
        pass


@dataclass(frozen=True)
class Tuning:
    """How a copy streams: passed in (tests make it quick), the defaults suit real links."""

    #: chunks (1 MiB as the sites read them) queued per target, in front of the site's own
    #: upload queue; a chunk is one bytes object shared by every queue of a read
    queue_chunks: int = 2
    #: seconds a target's queue may stay full, while another target waits for data, before
    #: that target is detached onto the second read (the others wait that long for it)
    detach_after: float = 0.5
    #: how many times one read of the source may be resumed after a cut
    resumes: int = 3
    #: how often a blocked hand-over looks at failures, cancellation and lag (seconds)
    tick: float = 0.05


@dataclass
class TargetResult:
    """What happened on one target."""

    site: str
    ok: bool = False
    image: ImageRecord | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    attempts: int = 0
    retry_after: float | None = None  # the site's hint, when it gave one
    #: how the bytes got there: "relay" (through imagesync) or a server-side import's method
    #: (engine.serverside: "web-download")
    via: str = "relay"


@dataclass
class CopyResult:
    """What one copy of one image version did, target by target."""

    source: ImageRecord
    version: Version
    bytes_read: int = 0
    seconds: float = 0.0
    sha512: str | None = None
    targets: list[TargetResult] = field(default_factory=list)
    #: reads of the source started (a second one serves detached targets) and cuts resumed
    reads: int = 0
    resumes: int = 0
    detached: list[str] = field(default_factory=list)  # targets served by a second read

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.targets)

    @property
    def cancelled(self) -> bool:
        return any(t.error_kind is ErrorKind.CANCELLED for t in self.targets)


def new_image_for(source: ImageRecord, version: Version, visibility: str) -> NewImage:
    """What a copy of ``source`` looks like on a target, before its bytes are verified."""
    props = source.user_properties()
    props[PROP_ORIGIN] = version.origin
    props[PROP_VERSION] = format_time(version.time)
    return NewImage(
        name=source.name,
        disk_format=source.disk_format,
        container_format=source.container_format,
        min_disk=source.min_disk,
        min_ram=source.min_ram,
        properties=props,
        size=source.size,
        visibility=visibility,
    )


def _expected(source: ImageRecord, version: Version) -> dict[str, str]:
    exp = {k: v.lower() for k, v in source.hashes.items() if k in ("sha512", "md5")}
    if version.sha512:
        if exp.get("sha512") and exp["sha512"] != version.sha512:
            # The site's own hash and the provenance claim disagree: trust nothing.
            exp["sha512-claimed"] = version.sha512
        else:
            exp["sha512"] = version.sha512
    return exp


class _Live:
    def __init__(
        self, site: Site, writer: Writer, result: TargetResult, watcher: UploadWatcher
    ) -> None:
        self.site = site
        self.writer = writer
        self.result = result
        self.watcher = watcher
        watcher.started(site.name, writer.image_id)

    def abort(self) -> None:
        """Abort the upload; never raises (one target's cleanup must not stop the others')."""
        try:
            self.writer.abort()
        except Exception as exc:
            # Still marked as uploading and hidden, and still leased: recovery removes it.
            log.warning(
                "cleanup.abort_failed",
                site=self.site.name,
                image_id=self.writer.image_id,
                error=str(exc),
                exc_info=not isinstance(exc, SiteError),
            )
            return
        self.watcher.ended(self.site.name, self.writer.image_id)

    def remove(self, image_id: str) -> None:
        """Delete a finished but unpublished upload (it failed verification, or we stop)."""
        try:
            self.site.delete(image_id)
        except Exception as exc:
            # Still marked as uploading and hidden: the next run's recovery removes it.
            log.warning(
                "cleanup.delete_failed",
                site=self.site.name,
                image_id=image_id,
                error=str(exc),
                exc_info=not isinstance(exc, SiteError),
            )
            return
        self.watcher.ended(self.site.name, image_id)


def _fail(live: _Live, exc: BaseException, kind: ErrorKind) -> None:
    live.result.ok = False
    _set_error(live.result, exc)
    live.result.error_kind = kind
    live.abort()
    _log_failed(live.site.name, exc, kind)


def _log_failed(site: str, exc: BaseException, kind: ErrorKind) -> None:
    # a bug (outside the SiteError hierarchy) is logged with its traceback
    unexpected = kind is ErrorKind.UNEXPECTED
    log.warning("copy.target_failed", site=site, error=str(exc), kind=kind, exc_info=unexpected)


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


def _attempt(
    source: Site,
    image: ImageRecord,
    version: Version,
    targets: Sequence[tuple[Site, NewImage]],
    progress: Progress | None,
    result: CopyResult,
    cancel: threading.Event | None = None,
    watcher: UploadWatcher | None = None,
    lease_expired: Callable[[], bool] | None = None,
    tuning: Tuning | None = None,
) -> list[TargetResult]:
    """One pass: stream to every target (those that fell behind from a second read). Raises
    TransientError when the first read failed, Cancelled (after removing every upload it
    started) when ``cancel`` was set."""
    results = [TargetResult(site=site.name) for site, _ in targets]
    live = _open_targets(targets, results, cancel, watcher or _NoWatcher())
    if not live:
        return results
    # md5 decides nothing when the source and every target report sha512 (the strongest
    # shared algorithm decides, see model.hashes_agree), and it costs ~2.3 CPU s per GB that
    # the Glance servers on the same cores need: compute it only when it can decide.
    need_md5 = "sha512" not in _expected(image, version) or any(
        "sha512" not in lv.site.capabilities.hashes for lv in live
    )
    fan = _FanOut(source, image, live, tuning or Tuning(), cancel, result, progress)
    nbytes, got = _stream(source, image, fan, progress, cancel, need_md5)
    result.bytes_read = max(result.bytes_read, nbytes)
    if not fan.ready and fan.second is None:
        return results  # every target failed while the source was read
    result.sha512 = got["sha512"]
    try:
        # 1. Did the source deliver the bytes it claims to hold?
        problems = _source_problems(image, version, nbytes, got)
        if problems:
            err = IntegrityError(f"{image.ref}: " + "; ".join(problems))
            for lv in fan.ready + fan.stop_second():
                _fail(lv, err, ErrorKind.INTEGRITY)
            return results
        # 2. Did each target store exactly these bytes? Then publish it: those that got every
        # byte from the first read now, those detached once the second read has served them.
        if not _settle_all(fan.ready, got, nbytes, cancel, lease_expired):
            _cancel_rest(fan.stop_second())
        elif fan.second is not None:
            _settle_all(fan.second.wait(fan.pulse), got, nbytes, cancel, lease_expired)
    except BaseException:
        # Ctrl-C (or a bug in the watcher) while settling: the detached targets still being
        # written wait for finish or abort (a Glance upload thread).
        _cancel_rest(fan.stop_second())
        raise
    return results


def _settle_all(
    live: Sequence[_Live],
    got: Mapping[str, str],
    nbytes: int,
    cancel: threading.Event | None,
    lease_expired: Callable[[], bool] | None,
) -> bool:
    """Settle every target, each in a thread of its own: a slow upload's ``finish`` (its site
    still taking the last bytes) must not hold up a fast one's publish. False when cancelled
    (the targets not settled yet were aborted)."""
    if len(live) == 1:
        return _settle_one(live[0], got, nbytes, cancel, lease_expired)
    outcome: dict[int, bool | BaseException] = {}

    def one(i: int) -> None:
        try:
            outcome[i] = _settle_one(live[i], got, nbytes, cancel, lease_expired)
        except BaseException as exc:  # a bug in the watcher: raised again below, once every
            outcome[i] = exc  # other target is settled (they are independent)

    threads = [
        threading.Thread(target=one, args=(i,), daemon=True, name=f"settle-{lv.site.name}")
        for i, lv in enumerate(live)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for value in outcome.values():
        if isinstance(value, BaseException):
            raise value
    return all(outcome.values())


def _settle_one(
    lv: _Live,
    got: Mapping[str, str],
    nbytes: int,
    cancel: threading.Event | None,
    lease_expired: Callable[[], bool] | None,
) -> bool:
    if cancel is not None and cancel.is_set():
        # Not finished yet: abort rather than wait for the site to settle the upload.
        # Targets already published stay published (and are reported so).
        _cancel_rest([lv])
        return False
    return _settle(lv, got, nbytes, cancel, lease_expired)


def _open_targets(
    targets: Sequence[tuple[Site, NewImage]],
    results: Sequence[TargetResult],
    cancel: threading.Event | None,
    watcher: UploadWatcher,
) -> list[_Live]:
    """Start an invisible upload on every target that accepts one."""
    live: list[_Live] = []
    try:
        for (site, new), res in zip(targets, results, strict=True):
            _check(cancel)
            res.attempts += 1
            try:
                writer = site.create(new)
            except Exception as exc:
                _set_error(res, exc)
                _log_failed(site.name, exc, _kind(exc))
                continue
            try:
                live.append(_Live(site, writer, res, watcher))
            except Exception as exc:  # the lease could not be recorded: do not write blind
                _set_error(res, exc)
                _log_failed(site.name, exc, _kind(exc))
                with contextlib.suppress(Exception):
                    writer.abort()
    except Cancelled:
        for lv in live:
            lv.abort()
        raise
    return live


def _stream(
    source: Site,
    image: ImageRecord,
    fan: _FanOut,
    progress: Progress | None,
    cancel: threading.Event | None,
    need_md5: bool,
) -> tuple[int, dict[str, str]]:
    """Read the whole source once (resuming a cut read), hash it and hand each chunk to the
    targets still on this read (``fan``: one that falls behind is detached onto a second read).
    Every target left on this read has written every byte when it returns (``fan.ready``).
    Returns the bytes read and their digests."""
    # each algorithm hashes in a thread of its own, beside the reads and the uploads
    hasher = MultiHasher(["sha512", "md5"] if need_md5 else ["sha512"])
    nbytes = 0
    stream = _read_from(source, image, 0, fan.tuning, fan.count)
    try:
        for chunk in stream:
            _check(cancel)
            hasher.update(chunk)
            nbytes += len(chunk)
            fan.hand(chunk)
            if progress is not None:
                progress(len(chunk))
            if not fan.busy:
                break
        _check(cancel)
        fan.end()
        got = hasher.hexdigests()
    except BaseException as exc:
        live = fan.abort_all()
        if isinstance(exc, SiteError):
            for lv in live:
                lv.result.error, lv.result.error_kind = str(exc), ErrorKind.SOURCE
            raise TransientError(f"reading {image.ref}: {exc}", site=source.name) from exc
        if isinstance(exc, Exception) and not isinstance(exc, Cancelled):
            # The source (or the progress callback) failed outside the hierarchy: a bug,
            # not worth a retry; every target was aborted above.
            raise _Unexpected(f"reading {image.ref}: {exc!r}") from exc
        raise
    finally:
        hasher.close()
        stream.close()
    return nbytes, got


def _read_from(
    source: Site, image: ImageRecord, offset: int, tuning: Tuning, count: Callable[[bool], None]
) -> Generator[bytes, None, None]:
    """The source's bytes from ``offset``. A read cut part-way (a TransientError: a dropped
    connection) is opened again from where it stopped, ``tuning.resumes`` times, once the
    source shows it still holds the same image; ``count(resumed)`` hears of every open."""
    pos, resumes = offset, 0
    while True:
        stream: Iterator[bytes] | None = None
        try:
            count(resumes > 0)
            stream = source.open(image, pos)
            for chunk in stream:
                pos += len(chunk)
                yield chunk
            return
        except TransientError as exc:
            if resumes >= tuning.resumes:
                raise
            resumes += 1
            log.info(
                "copy.source_resumed", source=image.ref, offset=pos, resume=resumes, error=str(exc)
            )
            _same_image(source, image)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def _same_image(source: Site, image: ImageRecord) -> None:
    """Before a cut read resumes: the source must still hold the image whose first bytes were
    read (same size, hashes and version), or the bytes spliced together would be no image."""
    now = source.get_image(image.id)
    changed = [
        what
        for what, before, after in (
            ("status", image.status, now.status),
            ("size", image.size, now.size),
            ("hashes", dict(image.hashes), dict(now.hashes)),
            ("version", _mark(image), _mark(now)),
        )
        if before != after
    ]
    if changed:
        raise SiteError(
            f"{image.ref} changed while it was read ({', '.join(changed)}): not resumed",
            site=source.name,
        )


def _mark(image: ImageRecord) -> tuple[str | None, ...]:
    return tuple(image.properties.get(k) for k in (PROP_ORIGIN, PROP_VERSION, PROP_SHA512))


class _Stopped(Exception):
    """A read was told to stop (the copy is being given up)."""


class _Feed:
    """One target's bounded queue of chunks and the thread that writes them to its upload, so
    that a slow target blocks only its own queue, and how far behind it is can be seen."""

    def __init__(self, live: _Live, tuning: Tuning, cancel: threading.Event | None) -> None:
        self.live = live
        self.cancel = cancel
        self.tick = tuning.tick
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=tuning.queue_chunks)
        self.sent = 0  # bytes queued for this target: where a second read takes it up
        self.written = 0  # bytes its upload took: signs of life (see _FanOut.pulse)
        #: since when every hand-over to it found its queue full (None: it had room), and
        #: what it had written then
        self.full_since: float | None = None
        self.written_then = 0
        self.error: Exception | None = None
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

    def end(self, cancel: threading.Event | None, pulse: Callable[[], None]) -> Exception | None:
        """No more chunks: wait until every queued one is written; the write's failure."""
        while self.thread.is_alive():
            try:
                self.q.put(None, timeout=self.tick)
                break
            except queue.Full:
                _check(cancel)
                pulse()
        while self.thread.is_alive():
            self.thread.join(timeout=self.tick)
            _check(cancel)
            pulse()
        _check(cancel)  # the thread may have stopped for it, with chunks left unwritten
        return self.error

    def stop(self) -> None:
        """Write no more (what is queued is dropped). Not waited for: the caller aborts the
        upload, which also ends a write blocked in a stuck one (whose failure is ignored)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.q.get_nowait()
        with contextlib.suppress(queue.Full):
            self.q.put_nowait(None)


class _Read:
    """One read of the source and the feeds it hands each chunk to, at ``pos``."""

    def __init__(self, tuning: Tuning, cancel: threading.Event | None, start: int = 0) -> None:
        self.tuning = tuning
        self.cancel = cancel
        self.pos = start  # offset of the next chunk
        self.feeds: list[_Feed] = []
        self.lock = threading.Lock()  # feeds may join from another thread (the first read)
        self.stopped = threading.Event()

    def hand(
        self,
        chunk: bytes,
        detach: Callable[[_Feed], bool] | None = None,
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
        feed: _Feed,
        data: bytes,
        detach: Callable[[_Feed], bool] | None,
        pulse: Callable[[], None],
    ) -> bool:
        """Queue ``data`` for one target, waiting while its queue is full; False when the
        target left this read (its upload failed, or ``detach`` took it)."""
        waited = False
        while True:
            if feed.error is not None:
                feed.stop()
                _fail(feed.live, feed.error, _kind(feed.error))
                return False
            try:
                feed.q.put(data, timeout=self.tuning.tick)
                feed.sent += len(data)
                if not waited:
                    feed.full_since = None  # it had room: not behind
                return True
            except queue.Full:
                waited = True
            _check(self.cancel)
            pulse()
            if self.stopped.is_set():
                raise _Stopped
            if detach is None:
                continue
            # Behind: its queue was full at every hand-over for a while (a throttled link takes
            # a chunk now and then, so one wait alone is short), and it holds another back.
            now = time.monotonic()
            if feed.full_since is None:
                feed.full_since, feed.written_then = now, feed.written
            starved = any(f.q.empty() for f in self.feeds if f is not feed)
            if now - feed.full_since >= self.tuning.detach_after and starved and detach(feed):
                return False

    def drain(self, pulse: Callable[[], None]) -> list[_Live]:
        """The read is over: every target still on it writes what is queued; those whose
        upload failed fail. Returns the others."""
        with self.lock:
            feeds = list(self.feeds)
        for feed in feeds:
            err = feed.end(self.cancel, pulse)  # Cancelled: stop_feeds() still finds the rest
            if err is not None:
                with self.lock:
                    self.feeds.remove(feed)
                _fail(feed.live, err, _kind(err))
        return self.stop_feeds()  # every thread has ended: only takes them off this read

    def stop_feeds(self) -> list[_Live]:
        """Stop every target's writing (not aborted yet): their uploads."""
        with self.lock:
            feeds, self.feeds = self.feeds, []
        for feed in feeds:
            feed.stop()
        return [f.live for f in feeds]


class _SecondRead(_Read):
    """The read serving the targets that fell behind, in a thread of its own, from the offset
    the first of them reached; others join it if it has not passed their offset yet."""

    def __init__(self, source: Site, image: ImageRecord, fan: _FanOut, first: _Feed) -> None:
        super().__init__(fan.tuning, fan.cancel, start=first.sent)
        self.start, self.t0 = first.sent, time.monotonic()
        self.source, self.image = source, image
        self.feeds.append(first)
        self.closed = False  # takes no more targets
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(fan.count,), daemon=True, name=f"read-{source.name}"
        )
        self.thread.start()

    def take(self, feed: _Feed) -> bool:
        """Serve ``feed`` too, if this read has not passed its offset and goes about as fast
        (a target twice as fast as the slow ones here is better off held a little on the
        first read than held to their pace)."""
        now = time.monotonic()
        with self.lock:
            rate = (self.pos - self.start) / max(now - self.t0, 1e-3)
            if self.closed or self.pos > feed.sent or feed.rate(now) > 2 * rate:
                return False
            self.feeds.append(feed)
            return True

    def _run(self, count: Callable[[bool], None]) -> None:
        stream = _read_from(self.source, self.image, self.pos, self.tuning, count)
        try:
            for chunk in stream:
                _check(self.cancel)
                if self.stopped.is_set():
                    return
                self.hand(chunk)
                with self.lock:
                    if not self.feeds:  # every target on it failed
                        self.closed = True
                        return
        except BaseException as exc:
            self.error = exc
        finally:
            with self.lock:
                self.closed = True
            stream.close()

    def wait(self, pulse: Callable[[], None]) -> list[_Live]:
        """The targets this read gave every byte to, once it is over (those it failed are
        failed: a source that failed them fails them as ``source``, retried alone)."""
        while self.thread.is_alive():
            self.thread.join(timeout=self.tuning.tick)
            pulse()
        if self.error is None:
            return self.drain(pulse)
        live = self.stop_feeds()
        if isinstance(self.error, Cancelled):
            _cancel_rest(live)
        elif isinstance(self.error, SiteError):
            err = TransientError(
                f"reading {self.image.ref} from offset {self.pos}: {self.error}",
                site=self.source.name,
            )
            for lv in live:
                _fail(lv, err, ErrorKind.SOURCE)
        else:
            log.error("copy.source_failed", source=self.image.ref, exc_info=self.error)
            for lv in live:
                _fail(lv, self.error, ErrorKind.UNEXPECTED)
        return []

    def stop(self) -> list[_Live]:
        self.stopped.set()
        self.thread.join()
        return self.stop_feeds()


class _FanOut:
    """The targets of one attempt: those on the first read of the source, and the second read
    that those which fell behind were detached onto (at most one: two reads per copy)."""

    def __init__(
        self,
        source: Site,
        image: ImageRecord,
        live: Sequence[_Live],
        tuning: Tuning,
        cancel: threading.Event | None,
        result: CopyResult,
        progress: Progress | None = None,
    ) -> None:
        self.source, self.image, self.tuning, self.cancel = source, image, tuning, cancel
        self.result = result
        self.first = _Read(tuning, cancel)
        self.first.feeds = [_Feed(lv, tuning, cancel) for lv in live]
        self.second: _SecondRead | None = None
        self.ready: list[_Live] = []  # set by end(): every byte written, from the first read
        self._count_lock = threading.Lock()
        self.progress = progress
        self._feeds = list(self.first.feeds)  # detached ones too: the same objects
        self._written = 0

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
        """Is any target still being served (the first read must go on, to hash for them)?"""
        return bool(self.first.feeds) or (self.second is not None and not self.second.closed)

    def hand(self, chunk: bytes) -> None:
        self.first.hand(chunk, self._detach, self.pulse)

    def _detach(self, feed: _Feed) -> bool:
        if self.second is None:
            self.second = _SecondRead(self.source, self.image, self, feed)
        elif not self.second.take(feed):
            return False  # the second read is past it: it stays on the first
        self.result.detached.append(feed.live.site.name)
        log.info("copy.detached", site=feed.live.site.name, offset=feed.sent)
        return True

    def end(self) -> None:
        self.ready = self.first.drain(self.pulse)

    def stop_second(self) -> list[_Live]:
        """Stop the second read; the uploads it was writing (not aborted yet)."""
        return self.second.stop() if self.second is not None else []

    def abort_all(self) -> list[_Live]:
        """Give up: abort every upload still being written or waiting to be settled."""
        live = self.first.stop_feeds() + self.ready + self.stop_second()
        self.ready = []
        for lv in live:
            lv.abort()
        return live


def _source_problems(
    image: ImageRecord, version: Version, nbytes: int, got: Mapping[str, str]
) -> list[str]:
    problems = []
    if image.size is not None and nbytes != image.size:
        problems.append(f"read {nbytes} bytes, the source says {image.size}")
    for algo, value in _expected(image, version).items():
        want_algo = "sha512" if algo == "sha512-claimed" else algo
        if got.get(want_algo) and got[want_algo] != value:
            problems.append(
                f"{want_algo} of the bytes read differs from the source's "
                f"({got[want_algo][:16]}… != {value[:16]}…)"
            )
    return problems


def _settle(
    lv: _Live,
    got: Mapping[str, str],
    nbytes: int,
    cancel: threading.Event | None,
    lease_expired: Callable[[], bool] | None = None,
) -> bool:
    """Finish one target's upload, verify what it stored, publish it or remove it.
    Returns False when cancelled (the caller aborts the rest)."""
    try:
        stored = lv.writer.finish()
    except Exception as exc:
        _fail(lv, exc, _kind(exc))
        return True
    try:
        agree = hashes_agree(got, stored.hashes)
        if stored.size is not None and stored.size != nbytes:
            agree = False
        if agree is None:
            agree = _read_back(lv.site, stored, got["sha512"], cancel)
    except Cancelled:
        lv.remove(stored.id)
        lv.result.error, lv.result.error_kind = "cancelled", ErrorKind.CANCELLED
        return False
    except Exception as exc:
        lv.remove(stored.id)
        _set_error(lv.result, exc, prefix="reading back: ")
        _log_failed(lv.site.name, exc, _kind(exc))
        return True
    if not agree:
        err = IntegrityError(
            f"{lv.site.name}: stored image {stored.id} does not match the "
            f"bytes sent (sha512 {got['sha512'][:16]}…): removed"
        )
        lv.remove(stored.id)
        lv.result.error, lv.result.error_kind = str(err), ErrorKind.INTEGRITY
        log.warning(
            "copy.target_failed", site=lv.site.name, error=str(err), kind=ErrorKind.INTEGRITY.value
        )
        return True
    if lease_expired is not None and lease_expired():
        # Another imagesync may remove an upload whose lease (its marker) has expired: never
        # publish one, it may be half-deleted by now (see engine.marker).
        lv.remove(stored.id)
        lv.result.error = f"{lv.site.name}: upload {stored.id} outlived its lease: removed"
        lv.result.error_kind = ErrorKind.SITE
        return True
    try:
        lv.result.image = lv.site.publish(stored.id, {PROP_SHA512: got["sha512"]})
    except Exception as exc:
        published = _failed_publish(lv, stored.id, exc)
        if published is None:
            return True
        lv.result.image = published
    lv.result.ok = True
    with contextlib.suppress(Exception):  # published: a lease left behind is only re-checked
        lv.watcher.ended(lv.site.name, stored.id)
    return True


def _failed_publish(lv: _Live, image_id: str, exc: Exception) -> ImageRecord | None:
    """``publish`` raised: the record if the image was published all the same, else None
    (the target's error set).

    A failed publish may have happened: the site acted and its answer was lost (a connection
    cut after Glance applied the update), or reading the image back afterwards failed. A
    published copy is never deleted (recovery's rule, here too), so the image is read again:
    still an upload, it is removed; published, the copy stands; when even that read fails,
    it is left marked and leased for recovery, which re-reads it under the lock."""
    try:
        now: ImageRecord | None = lv.site.get_image(image_id)
    except NotFound:
        now = None
    except Exception as err:
        _set_error(lv.result, exc)
        log.warning(
            "copy.publish_unknown",
            site=lv.site.name,
            image_id=image_id,
            error=str(exc),
            reread_error=str(err),
        )
        return None
    if now is not None and not now.in_progress:
        log.info(
            "copy.published_despite_error", site=lv.site.name, image_id=image_id, error=str(exc)
        )
        return now
    if now is not None:
        lv.remove(image_id)
    else:
        lv.watcher.ended(lv.site.name, image_id)
    _set_error(lv.result, exc)
    _log_failed(lv.site.name, exc, _kind(exc))
    return None


def _cancel_rest(live: Sequence[_Live]) -> None:
    for lv in live:
        lv.result.error, lv.result.error_kind = "cancelled", ErrorKind.CANCELLED
        lv.abort()


def _read_back(
    site: Site, stored: ImageRecord, sha512: str, cancel: threading.Event | None = None
) -> bool:
    """The target reports no hash we share: read the copy back and hash it ourselves."""
    h = hashlib.sha512()
    stream = site.open(stored)
    try:
        for chunk in stream:
            _check(cancel)
            h.update(chunk)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return h.hexdigest() == sha512


class _Unexpected(Exception):
    """The source failed outside the SiteError hierarchy (a bug): no target is retried."""


def _kind(exc: BaseException) -> ErrorKind:
    if isinstance(exc, IntegrityError):
        return ErrorKind.INTEGRITY
    if isinstance(exc, TransientError):
        return ErrorKind.TRANSIENT
    if isinstance(exc, SiteError):
        return ErrorKind.SITE
    return ErrorKind.UNEXPECTED  # a bug in a site: that target fails, the others go on


def _set_error(res: TargetResult, exc: BaseException, prefix: str = "") -> None:
    res.error, res.error_kind = f"{prefix}{exc}", _kind(exc)
    if isinstance(exc, TransientError):
        res.retry_after = exc.retry_after


def copy_image(
    source: Site,
    image: ImageRecord,
    targets: Sequence[tuple[Site, NewImage]],
    *,
    policy: RetryPolicy | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
    cancel: threading.Event | None = None,
    watcher: UploadWatcher | None = None,
    lease_expired: Callable[[], bool] | None = None,
    tuning: Tuning | None = None,
) -> CopyResult:
    """Copy ``image`` from ``source`` to every target, reading the source once per attempt
    (twice when a target fell behind the others; ``tuning`` says when and how).

    When ``cancel`` is set the copy stops at the next chunk, removes every upload it made and
    returns with the unfinished targets marked ``cancelled`` (targets already published stay).
    When ``lease_expired()`` says the uploads' lease is over, verified uploads are removed
    instead of published.
    """
    policy = policy or RetryPolicy()
    version = image.version
    result = CopyResult(source=image, version=version)
    started = time.monotonic()
    pending = list(targets)
    final: dict[str, TargetResult] = {}
    attempt = 0
    while pending:
        attempt += 1
        try:
            outcome = _attempt(
                source,
                image,
                version,
                pending,
                progress,
                result,
                cancel,
                watcher,
                lease_expired,
                tuning,
            )
        except TransientError as exc:
            outcome = [
                TargetResult(
                    site=s.name,
                    error=str(exc),
                    error_kind=ErrorKind.TRANSIENT,
                    retry_after=exc.retry_after,
                )
                for s, _ in pending
            ]
        except Cancelled:
            outcome = [
                TargetResult(site=s.name, error="cancelled", error_kind=ErrorKind.CANCELLED)
                for s, _ in pending
            ]
        except _Unexpected as exc:
            log.error("copy.source_failed", source=image.ref, error=str(exc), exc_info=True)
            outcome = [
                TargetResult(site=s.name, error=str(exc), error_kind=ErrorKind.UNEXPECTED)
                for s, _ in pending
            ]
        retry = []
        for (site, new), res in zip(pending, outcome, strict=True):
            res.attempts = attempt
            final[site.name] = res
            if not res.ok and res.error_kind is not None and res.error_kind.retryable:
                retry.append((site, new))
        if not retry or attempt >= policy.attempts:
            break
        hints = [final[s.name].retry_after for s, _ in retry]
        hint = max((h for h in hints if h is not None), default=None)
        if not policy.pause(
            attempt,
            hint,
            what=f"copy {image.ref}",
            sleep=sleep,
            cancel=cancel,
            targets=[s.name for s, _ in retry],
        ):
            for site, _ in retry:
                final[site.name] = TargetResult(
                    site=site.name,
                    error="cancelled",
                    error_kind=ErrorKind.CANCELLED,
                    attempts=attempt,
                )
            break
        pending = retry
    result.targets = [final[s.name] for s, _ in targets]
    result.seconds = time.monotonic() - started
    return result
