"""The bounded scratch directory a conversion (``convert.py``) works in: room is held before
anything is written, so that the conversions running at once, in every process sharing the
directory, stay within ``conversion.scratch_max_size`` and the disk's free space; a conversion
that cannot have the room fails at once, saying what it needs and what there is. Rooms a
killed process left behind are swept by the next conversion (nobody holds their lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from imagesync.errors import ImageSyncError

log = structlog.get_logger("imagesync.convert")


class ConversionFailed(ImageSyncError):
    """A conversion could not be done; the message says why and what to do."""


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class Scratch:
    """A bounded scratch directory: a conversion holds room there before writing, so that the
    conversions running at once, in every process sharing the directory (the daemon and a
    ``push``), together stay within ``max_size`` and the disk's free space.

    Each conversion works in a room (``convert-*``) that says in its ``.reserved`` file how
    much it holds; rooms are counted, created and removed under an ``flock`` of the
    directory's ``.budget.lock``."""

    def __init__(
        self,
        directory: Path,
        max_size: int,
        free: Callable[[Path], int] | None = None,
    ) -> None:
        self.directory = directory
        self.max_size = max_size
        self._free = free or (lambda p: shutil.disk_usage(p).free)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.directory / ".budget.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def room(self, what: str) -> Iterator[Room]:
        """A private subdirectory holding nothing yet; it is gone on exit.

        Each room holds an exclusive ``flock`` on its ``.lock`` file while in use, so the
        rooms a killed process left behind (nobody holds their lock) are removed here, by
        whichever process converts next, and a live one's (the daemon's while ``push`` runs)
        never are."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / f"convert-{uuid.uuid4().hex[:12]}"
        with self._locked():
            self._sweep()
            path.mkdir(mode=0o700)  # the images may be private: the room is imagesync's alone
            lock = (path / ".lock").open("w")
            fcntl.flock(lock, fcntl.LOCK_EX)
        room = Room(self, path, what)
        try:
            yield room
        finally:
            with self._locked():
                shutil.rmtree(path, ignore_errors=True)
            lock.close()

    @contextlib.contextmanager
    def spool(self, size: int) -> Iterator[Path | None]:
        """A room holding ``size`` bytes for a copy's spool (``imagesync.spool``), or None
        when the budget or the disk cannot give them: the copy then reads the source a second
        time for the targets that fall behind, which needs no room."""
        with self.room("a spool") as room:
            try:
                room.need(size, "a spool for the targets that fall behind")
            except ConversionFailed as exc:
                log.info("copy.no_spool", reason=str(exc), then="a second read of the source")
                yield None
            else:
                yield room.path

    def _sweep(self) -> None:
        for old in self.directory.glob("convert-*"):
            try:
                with (old / ".lock").open("a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    log.info("convert.leftover_removed", path=str(old))
                    shutil.rmtree(old, ignore_errors=True)
            except BlockingIOError:
                continue  # another conversion is working there
            except OSError:
                shutil.rmtree(old, ignore_errors=True)  # no lock file: never got going

    def _held_by_others(self, mine: Path) -> int:
        total = 0
        for other in self.directory.glob("convert-*"):
            if other != mine:
                with contextlib.suppress(OSError, ValueError):
                    total += int((other / ".reserved").read_text() or 0)
        return total

    def _hold(self, room: Room, total: int, detail: str) -> None:
        with self._locked():
            if total > room.held:
                others = self._held_by_others(room.path)
                if others + total > self.max_size:
                    busy = (
                        f" ({size_text(others)} of it held by other conversions)" if others else ""
                    )
                    raise ConversionFailed(
                        f"scratch space too small: it needs {size_text(total)} in "
                        f"{self.directory} ({detail}), but conversion.scratch_max_size is "
                        f"{size_text(self.max_size)}{busy}: raise scratch_max_size (and make "
                        "room on that disk), or give this cloud a disk_formats: entry that "
                        "takes the image as it is"
                    )
                free = self._free(self.directory)
                if total - room.held > free:
                    raise ConversionFailed(
                        f"scratch space too small: it needs {size_text(total)} in "
                        f"{self.directory} ({detail}), but its disk has only {size_text(free)} "
                        "free: free some space there or point conversion.scratch_dir at a "
                        "larger disk"
                    )
            (room.path / ".reserved").write_text(str(total))
            room.held = total


class Room:
    """One conversion's directory and how much of the scratch budget it holds."""

    def __init__(self, scratch: Scratch, path: Path, what: str) -> None:
        self.scratch = scratch
        self.path = path
        self.what = what
        self.held = 0

    def need(self, total: int, detail: str) -> None:
        """Hold ``total`` bytes in all (more or less than now); raise ConversionFailed when
        the scratch directory cannot give them."""
        self.scratch._hold(self, total, detail)
