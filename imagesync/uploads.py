"""The results of a copy and its uploads in flight: what ``imagesync.transfer`` (and the
fan-out under it) report per target, how a copy is tuned, and one target's upload (``Live``)
with the rules for failing it alone: a failing target is aborted or deleted and its error
recorded with its kind, while the others carry on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import structlog

from imagesync.errors import Cancelled, IntegrityError, SiteError, TransientError
from imagesync.model import ImageRecord, Version
from imagesync.sites.base import Site, Writer

# the copy's events keep the logger they always had
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


class NoWatcher:
    """Hears nothing: a copy started without a watcher."""

    def started(self, site: str, image_id: str) -> None:
        pass

    def ended(self, site: str, image_id: str) -> None:
        pass


class Paces:
    """How fast each target site took a copy's bytes, as this process last saw it (bytes/s of
    its writes from the copy's start to its last byte), so that a target known to be much
    slower than the others is given the second read of the source from the start, instead of
    holding the others back until it is detached. In memory: one per process (the executor's),
    shared by its copies; a push process starts with none and detaches as it goes."""

    def __init__(self) -> None:
        self._rates: dict[str, float] = {}
        self._lock = threading.Lock()  # the daemon's copies run in parallel

    def note(self, site: str, nbytes: int, seconds: float) -> None:
        """One copy's bytes to ``site`` took ``seconds``; the average of the last two
        copies' rates is kept (a link's speed drifts; one odd copy moves it half-way)."""
        rate = nbytes / max(seconds, 1e-3)
        with self._lock:
            before = self._rates.get(site)
            self._rates[site] = rate if before is None else (before + rate) / 2

    def rate(self, site: str) -> float | None:
        with self._lock:
            return self._rates.get(site)

    def slower(self, sites: Sequence[str], factor: float) -> list[str]:
        """The ``sites`` known to take bytes ``factor`` times slower than the fastest known
        of the others (never every one of them: the fastest is not)."""
        with self._lock:
            known = {s: self._rates[s] for s in sites if s in self._rates}
        return [
            s
            for s, r in known.items()
            if r * factor < max((o for t, o in known.items() if t != s), default=0.0)
        ]


@dataclass(frozen=True)
class Tuning:
    """How a copy streams: passed in (tests make it quick), the defaults suit real links."""

    #: chunks (1 MiB as the sites read them) queued per target, in front of the site's own
    #: upload queue; a chunk is one bytes object shared by every queue of a read
    queue_chunks: int = 2
    #: seconds a target may hold the reader back (the reader waiting on its full queue while
    #: another target has nothing left to write), counted only while it does, before it is
    #: detached (onto the spool, else the second read): the others wait about that long for it
    detach_after: float = 0.2
    #: where a copy may keep a spool of its read (``imagesync.spool``), so that each target
    #: that falls behind is served from local disk at its own pace: called with the bytes
    #: needed, it gives a directory holding room for them, or None when there is none (the
    #: copy then detaches onto one second read of the source). None: never spool.
    spool_room: Callable[[int], AbstractContextManager[Path | None]] | None = None
    #: a wait for one chunk shorter than this does not count towards detaching: targets of
    #: about one speed on a busy machine keep making each other wait a few ms (1 GiB to three
    #: lab clouds: counting those waits detached two of the three onto the spool, +2 CPU s of
    #: page-cache copies, 12% slower); a link under ~50 MiB/s makes the reader wait 20 ms or
    #: more for each 1 MiB chunk
    short_wait: float = 0.02
    #: what the copy remembers of each target's speed (None: nothing): a target known to be
    #: ``slower_than`` times slower than the fastest other one is detached from the start
    paces: Paces | None = None
    slower_than: float = 3.0
    #: copies smaller than this teach ``paces`` nothing (their speed is mostly latency)
    pace_min_bytes: int = 16 << 20
    #: the clock the detaching and the paces go by (injected by tests)
    clock: Callable[[], float] = time.monotonic
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


class Live:
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


def fail(live: Live, exc: BaseException, kind: ErrorKind) -> None:
    live.result.ok = False
    set_error(live.result, exc)
    live.result.error_kind = kind
    live.abort()
    log_failed(live.site.name, exc, kind)


def log_failed(site: str, exc: BaseException, kind: ErrorKind) -> None:
    # a bug (outside the SiteError hierarchy) is logged with its traceback
    unexpected = kind is ErrorKind.UNEXPECTED
    log.warning("copy.target_failed", site=site, error=str(exc), kind=kind, exc_info=unexpected)


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


def cancel_rest(live: Sequence[Live]) -> None:
    for lv in live:
        lv.result.error, lv.result.error_kind = "cancelled", ErrorKind.CANCELLED
        lv.abort()


def kind_of(exc: BaseException) -> ErrorKind:
    if isinstance(exc, IntegrityError):
        return ErrorKind.INTEGRITY
    if isinstance(exc, TransientError):
        return ErrorKind.TRANSIENT
    if isinstance(exc, SiteError):
        return ErrorKind.SITE
    return ErrorKind.UNEXPECTED  # a bug in a site: that target fails, the others go on


def set_error(res: TargetResult, exc: BaseException, prefix: str = "") -> None:
    res.error, res.error_kind = f"{prefix}{exc}", kind_of(exc)
    if isinstance(exc, TransientError):
        res.retry_after = exc.retry_after
