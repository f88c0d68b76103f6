"""Streamed uploads shared by the HTTP sites: a request body fed through a bounded queue by
``Writer.write`` while a thread sends it, and the feeding, ending and waking of that thread.

Glance and VOSpace both send an image as one HTTP request whose body is the chunks the
transfer hands to ``write``; only what they send (the request) and what they report
(``finish``) differ, so the queue, the once-only body and the three loops live here.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

from imagesync.errors import SiteError

# Chunks (1 MiB as transfer reads them) queued per target. A chunk is one bytes object shared
# by every target's queue of one read, so memory stays bounded by this depth, not by depth x
# targets. It was 16 so that one target could fall behind the others for a moment without
# stalling them (a 1→3 fan-out: 0.82 → 0.88 of the curl relays' speed, peak RSS 78 → 85 MB);
# transfer.py now gives each target a queue of its own in front of this one and detaches one
# that stays behind onto a second read, whose queues hold other chunks: each Glance upload on
# its own read holds this many MiB more (bench/README.md, bench_network.py, 200 MiB fan-out
# with a slow cloud: 111 MB at 16, 96 MB at 8, 88 MB at 4; one cloud alone 80 → 76 MB).
QUEUE_CHUNKS = 4
_END = None
_ABORT = object()


class QueueBody:
    """A request body of the chunks queued by ``write``, sent as they come, once only.

    With the size known, ``len()`` gives it and requests sends a plain body with a
    Content-Length rather than a chunked one (cheaper for the servers; see glance.py).
    ``started`` tells whether any byte was taken. Subclasses may ``transform`` each chunk and
    add a ``tail`` (compression)."""

    def __init__(self, size: int | None) -> None:
        self.q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.size = size
        self.started = False
        self.sent = 0  # bytes of the image taken

    def __len__(self) -> int:
        return self.size or 0  # 0: unknown (or empty): requests sends it chunked

    def __bool__(self) -> bool:
        # requests sends ``data or {}``: a body of unknown length (len 0) must not count as
        # no body at all, or an empty PUT goes out and the data is never taken
        return True

    def __iter__(self) -> Iterator[bytes]:
        if self.started:
            raise ConnectionError("upload body already sent once: cannot replay it")
        self.started = True
        return self._chunks()

    def transform(self, chunk: bytes) -> bytes:
        return chunk

    def tail(self) -> bytes:
        return b""

    def _chunks(self) -> Iterator[bytes]:
        while True:
            item = self.q.get()
            if item is _END:
                if self.size and self.sent != self.size:
                    raise OSError(f"upload ended after {self.sent} of {self.size} bytes")
                if tail := self.tail():
                    yield tail
                return
            if item is _ABORT:
                raise OSError("upload aborted by imagesync")
            assert isinstance(item, bytes)
            self.sent += len(item)
            if self.size and self.sent > self.size:
                raise OSError(f"more than the {self.size} bytes announced")
            if data := self.transform(item):
                yield data


class QueuedUpload:
    """What a Writer over a ``QueueBody`` sent by ``thread`` shares: subclasses set ``body``
    and ``thread`` and say how a failure of the thread reads (``_raise_if_failed``) and what
    it means that the thread ended before the data did (``_closed``)."""

    body: QueueBody
    thread: threading.Thread

    def _raise_if_failed(self) -> None:
        raise NotImplementedError

    def _closed(self) -> SiteError:
        raise NotImplementedError

    def _put(self, chunk: bytes) -> None:
        """Queue a chunk, waiting (back-pressure) while the thread still sends."""
        while True:
            self._raise_if_failed()
            if not self.thread.is_alive():
                self._raise_if_failed()
                raise self._closed()
            try:
                self.body.q.put(chunk, timeout=0.5)
                return
            except queue.Full:
                continue

    def _end(self) -> None:
        """All chunks queued: let the body end and wait for the request's answer."""
        while self.thread.is_alive():
            try:
                self.body.q.put(_END, timeout=0.5)
                break
            except queue.Full:
                continue
        self.thread.join()
        self._raise_if_failed()

    def _wake(self, timeout: float) -> None:
        """Give up: make the request fail (the body raises), then wait for the thread."""
        while self.thread.is_alive():
            try:
                self.body.q.put(_ABORT, timeout=0.2)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.body.q.get_nowait()
        self.thread.join(timeout=timeout)
