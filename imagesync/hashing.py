"""Hashing a stream with several algorithms at once, each in a worker thread of its own.

A copy hashes every byte it reads: sha512 (the image's identity) and, when a side lacks
sha512, md5 (what checks what a store such as VOSpace stored). Done in the thread that reads
the source and feeds the targets, the hashing is on that thread's path: on 2 cores a 1 GiB
push spent more time in ``update`` than a ``curl | curl`` relay spends on the whole copy.
hashlib releases the GIL while it hashes a large buffer, so here each algorithm runs in its
own thread: the reading thread only hands each chunk on, and sha512, md5, the reads and the
uploads proceed side by side on whatever cores are free.

Memory stays bounded: each worker's queue holds at most ``depth`` chunks, and a chunk is one
immutable ``bytes`` object shared by every queue (and by the targets' upload queues), so a
:class:`MultiHasher` holds at most ``depth`` chunks of its own however large the image.
``update`` waits (back-pressure) while a worker is that far behind.

The results are hashlib's, byte for byte: the chunks reach each algorithm in order. A worker
that fails makes the next ``update`` or ``hexdigests`` raise that error; ``close`` (or
leaving the ``with`` block) ends every worker, whether the stream finished or was abandoned,
so no thread outlives an aborted copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Protocol, Self

# Chunks (1 MiB as the transfer reads them) a worker may lag behind the reader. Enough to
# ride out a moment without a core; small, because the chunks are held until hashed.
DEPTH = 8
_STOP = None


class Hash(Protocol):
    """What a worker needs of a hashlib object."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hash(algo: str) -> Hash:
    """hashlib's object for ``algo``. md5 here checks what a store stored; it is no security
    measure (FIPS builds refuse md5 unless told so)."""
    return hashlib.new(algo, usedforsecurity=algo != "md5")


class HashingError(RuntimeError):
    """A hash worker failed (the cause is chained); the digests are not to be trusted."""


class _Worker:
    """One algorithm, fed through a bounded queue by one thread."""

    def __init__(self, algo: str, depth: int, new: Callable[[str], Hash]) -> None:
        self.algo = algo
        self.hash = new(algo)
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.abandoned = False
        self.thread = threading.Thread(target=self._run, name=f"hash-{algo}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        update = self.hash.update
        get = self.q.get
        while (chunk := get()) is not _STOP:
            if self.error is not None or self.abandoned:
                continue  # keep draining, so that a ``put`` waiting for room is released
            try:
                update(chunk)
            except BaseException as exc:  # handed to the caller's thread
                self.error = exc

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise HashingError(f"hashing {self.algo} failed: {self.error!r}") from self.error

    def stop(self, abandon: bool) -> None:
        """End the thread: after hashing every chunk queued, or (``abandon``) skipping
        them. Returns once it has ended."""
        if abandon:
            self.abandoned = True
        while self.thread.is_alive():
            try:
                self.q.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if abandon:  # make room for the stop: these chunks will not be hashed
                    with contextlib.suppress(queue.Empty):
                        self.q.get_nowait()
        self.thread.join()


class MultiHasher:
    """``update`` with chunks in order, then ``hexdigests()``: ``{algo: hex digest}`` as
    hashlib gives it. Use as a context manager (or call ``close``) so that the workers end
    even when the stream is abandoned. ``new`` makes each algorithm's hash object (a seam
    for tests)."""

    def __init__(
        self, algorithms: Iterable[str], depth: int = DEPTH, new: Callable[[str], Hash] = new_hash
    ) -> None:
        names = list(dict.fromkeys(algorithms))
        if not names:
            raise ValueError("MultiHasher needs at least one algorithm")
        for name in names:
            if name not in hashlib.algorithms_available:
                raise ValueError(f"unknown hash algorithm {name!r}")
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._workers: list[_Worker] = []
        self._closed = False
        try:
            for name in names:
                self._workers.append(_Worker(name, depth, new))
        except BaseException:
            self.close()
            raise

    @property
    def algorithms(self) -> list[str]:
        return [w.algo for w in self._workers]

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Hand ``chunk`` to every algorithm; waits while a worker is ``depth`` behind."""
        if self._closed:
            raise ValueError("update on a closed MultiHasher")
        if not isinstance(chunk, bytes):
            # a bytearray or memoryview could change after being queued: hash a snapshot
            chunk = bytes(chunk)
        for w in self._workers:
            w.raise_if_failed()
            w.q.put(chunk)

    def hexdigests(self) -> dict[str, str]:
        """Every chunk hashed: the digests, ``{algo: hex}``. Ends the workers."""
        if self._closed:
            raise ValueError("hexdigests on a closed MultiHasher")
        self._closed = True
        for w in self._workers:
            w.stop(abandon=False)
        for w in self._workers:
            w.raise_if_failed()
        return {w.algo: w.hash.hexdigest() for w in self._workers}

    def close(self) -> None:
        """End every worker without waiting for the chunks still queued (the stream was
        abandoned, or the digests were taken). Safe to call more than once."""
        self._closed = True
        for w in self._workers:
            w.stop(abandon=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
