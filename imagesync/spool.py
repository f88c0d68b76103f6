"""A copy's spool: the bytes of its one read of the source, from some offset on, kept in an
unlinked file on local disk, so that each target that fell behind is served from there at its
own pace, by a reader of its own, while the read of the source goes on at the fast targets'
pace (``imagesync.fanout``). The source is then read once, however many paces the targets
have; memory stays bounded (a reader holds one chunk; the file lives in the page cache and on
disk, in a room of the bounded scratch directory, ``convert_scratch.Scratch.spool``).

Every byte a target gets from the spool was hashed by the read that wrote it, and what the
target stored is compared with those digests before it is published: a spool that lost or
changed a byte fails that target, never a version.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Generator
from pathlib import Path

from imagesync.errors import SiteError


class SpoolFailed(SiteError):
    """The spool could not be written or read (a full or failing disk): the targets it serves
    fail as if their read of the source had failed, and are retried alone."""


class Spool:
    """The bytes from ``base`` on, appended by one writer (the read of the source), read by
    any number of readers (``chunks``), each waiting while it has caught up with the writer.

    The file lives in ``directory`` (a scratch room), unlinked at once, so nothing is left on
    disk by a killed process; :meth:`close` closes it."""

    def __init__(self, directory: Path, base: int, chunk_size: int = 1 << 20) -> None:
        self.fd, name = tempfile.mkstemp(prefix="spool-", dir=directory)
        os.unlink(name)
        self.base = base
        self.end = base  # offset just past the last byte written
        self.chunk_size = chunk_size
        self.complete = False  # the writer has appended its last byte
        self.error: OSError | None = None
        self._cond = threading.Condition()

    def append(self, chunk: bytes) -> None:
        """The next bytes of the read (the writer's thread). A write that fails is kept and
        told to every reader; the read of the source goes on for the targets on it."""
        if self.error is not None or self.complete:
            return
        try:
            view = memoryview(chunk)
            while view:  # os.write may write less than it is given
                view = view[os.pwrite(self.fd, view, self.end - self.base) :]
                # (pwrite from the spool's own offset: readers' preads never move a position)
        except OSError as exc:
            with self._cond:
                self.error = exc
                self._cond.notify_all()
            return
        with self._cond:
            self.end += len(chunk)
            self._cond.notify_all()

    def finish(self) -> None:
        """Every byte is in: readers that have caught up stop."""
        with self._cond:
            self.complete = True
            self._cond.notify_all()

    def chunks(
        self, offset: int, stop: Callable[[], bool], tick: float
    ) -> Generator[bytes, None, None]:
        """The bytes from ``offset`` (at least ``base``) to the end, as the writer appends them;
        returns early when ``stop()`` (looked at every ``tick`` seconds while waiting)."""
        if offset < self.base:
            raise ValueError(f"the spool starts at {self.base}, not {offset}")
        pos = offset
        while True:
            with self._cond:
                while pos >= self.end and not self.complete and self.error is None:
                    if stop():
                        return
                    self._cond.wait(tick)
                end, error = self.end, self.error
            if pos < end:
                n = min(self.chunk_size, end - pos)
                try:
                    data = os.pread(self.fd, n, pos - self.base)
                except OSError as exc:
                    raise SpoolFailed(f"reading the spool at {pos}: {exc}") from exc
                if len(data) != n:
                    raise SpoolFailed(f"the spool gave {len(data)} bytes at {pos}, not {n}")
                pos += n
                yield data
            elif error is not None:
                raise SpoolFailed(f"writing the spool at {end}: {error}")
            else:
                return  # complete, and every byte given

    def close(self) -> None:
        with self._cond:
            self.complete = True
            self._cond.notify_all()
        os.close(self.fd)
