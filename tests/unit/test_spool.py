"""The spool: a copy's one read of the source kept on local disk, so that every target that
falls behind is served at its own pace by a reader of its own, and the source is read once.

In-memory sites; a held target's writes wait on an event that opens when another target has
published (told by the upload watcher), so the assertions are about order and counts, never
about time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagesync.convert_scratch import Scratch
from imagesync.sites.memory import Faults, MemorySite
from imagesync.spool import Spool, SpoolFailed
from imagesync.transfer import CopyResult, Tuning
from tests.unit.test_fanout import DATA, HOLD, _holds, _Source
from tests.unit.test_fanout import _copy as copy

Room = Callable[[int], contextlib.AbstractContextManager[Path | None]]


class _Chain:
    """An UploadWatcher noting uploads ended (published), in order; ``after[site]`` names the
    site whose publishing opens ``site``'s gate."""

    def __init__(self, after: dict[str, str]) -> None:
        self.after = after
        self.order: list[str] = []
        self.gates = {site: threading.Event() for site in after}
        self.timed_out: list[str] = []  # held targets whose gate never opened in time

    def started(self, site: str, image_id: str) -> None:
        pass

    def ended(self, site: str, image_id: str) -> None:
        self.order.append(site)
        for held, opener in self.after.items():
            if opener == site:
                self.gates[held].set()

    def held(self, name: str, after_chunks: int) -> MemorySite:
        """A target whose writes stop after ``after_chunks`` chunks until its gate opens."""
        writes = 0

        def hook(op: str, image_id: str | None) -> None:
            nonlocal writes
            if op == "write":
                writes += 1
                if writes == after_chunks and not self.gates[name].wait(HOLD):
                    self.timed_out.append(name)

        return MemorySite(name, Faults(hook=hook))


class _Rooms:
    """A ``Tuning.spool_room`` in ``directory``: notes what each copy asked for."""

    def __init__(self, directory: Path, room: bool = True) -> None:
        self.directory, self.room = directory, room
        self.asked: list[int] = []

    @contextlib.contextmanager
    def __call__(self, size: int) -> Iterator[Path | None]:
        self.asked.append(size)
        yield self.directory if self.room else None


def _copy(
    src: MemorySite,
    targets: list[MemorySite],
    watcher: _Chain,
    room: Room,
    cancel: threading.Event | None = None,
) -> CopyResult:
    tuning = Tuning(queue_chunks=2, detach_after=0.01, tick=0.002, spool_room=room)
    return copy(src, targets, watcher, tuning, cancel=cancel)[1]


def test_each_target_behind_keeps_its_own_pace_and_the_source_is_read_once(
    tmp_path: Path,
) -> None:
    # mid waits for fast to publish, slow for mid: only if neither holds another back (each
    # on a read of its own) do they publish in that order without a gate timing out
    chain = _Chain({"mid": "fast", "slow": "mid"})
    slow, mid, fast = chain.held("slow", 20), chain.held("mid", 40), MemorySite("fast")
    src = _Source("src")
    rooms = _Rooms(tmp_path)
    result = _copy(src, [slow, mid, fast], chain, rooms)
    assert result.ok, [t.error for t in result.targets]
    assert chain.order == ["fast", "mid", "slow"] and chain.timed_out == []
    assert sorted(result.detached) == ["mid", "slow"]
    assert src.offsets == [0] and result.reads == 1 and src.served == len(DATA)
    assert len(rooms.asked) == 1 and 0 < rooms.asked[0] <= len(DATA)  # one spool, opened late
    assert all(t.attempts == 1 for t in result.targets)
    assert all(_holds(t) == DATA for t in (slow, mid, fast))
    assert list(tmp_path.iterdir()) == []  # the spool's file was never visible


def test_without_room_for_a_spool_the_targets_behind_share_a_second_read(
    tmp_path: Path,
) -> None:
    chain = _Chain({"slow": "fast"})
    slow, fast = chain.held("slow", 20), MemorySite("fast")
    src = _Source("src")
    # a real scratch directory whose budget is smaller than the image
    scratch = Scratch(tmp_path / "scratch", max_size=len(DATA) // 10)
    result = _copy(src, [slow, fast], chain, scratch.spool)
    assert result.ok and chain.order == ["fast", "slow"]
    assert result.detached == ["slow"] and result.reads == 2 and len(src.offsets) == 2
    assert _holds(slow) == DATA
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == [".budget.lock"]


def test_a_spool_room_from_the_scratch_directory_is_removed_after_the_copy(
    tmp_path: Path,
) -> None:
    chain = _Chain({"slow": "fast"})
    slow, fast = chain.held("slow", 20), MemorySite("fast")
    scratch = Scratch(tmp_path / "scratch", max_size=10 * len(DATA))
    src = _Source("src")
    result = _copy(src, [slow, fast], chain, scratch.spool)
    assert result.ok and result.reads == 1 and result.detached == ["slow"]
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == [".budget.lock"]


def test_a_spool_that_cannot_be_written_fails_only_the_detached_target_retried_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    writes = 0

    def full_disk(fd: int, data: bytes | memoryview, offset: int) -> int:
        nonlocal writes
        writes += 1
        if writes == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr("imagesync.spool.os.pwrite", full_disk)
    chain = _Chain({"slow": "fast"})
    slow, fast = chain.held("slow", 20), MemorySite("fast")
    result = _copy(_Source("src"), [slow, fast], chain, _Rooms(tmp_path))
    by_site = {t.site: t for t in result.targets}
    assert result.ok
    assert by_site["fast"].attempts == 1  # never re-sent for the spool's failure
    assert by_site["slow"].attempts == 2  # re-sent alone, from a fresh read
    assert _holds(fast) == DATA and _holds(slow) == DATA and len(slow.images) == 1


def test_a_byte_the_spool_changed_is_caught_and_nothing_of_it_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pread
    flipped = False

    def rot(fd: int, n: int, offset: int) -> bytes:
        nonlocal flipped
        data = real(fd, n, offset)
        if not flipped and data:
            flipped = True
            return bytes([data[0] ^ 1]) + data[1:]
        return data

    monkeypatch.setattr("imagesync.spool.os.pread", rot)
    chain = _Chain({"slow": "fast"})
    slow, fast = chain.held("slow", 20), MemorySite("fast")
    result = _copy(_Source("src"), [slow, fast], chain, _Rooms(tmp_path))
    by_site = {t.site: t for t in result.targets}
    assert flipped
    assert by_site["fast"].error is None and _holds(fast) == DATA
    # what the slow cloud stored is not what the read hashed: removed, never published
    assert by_site["slow"].error_kind == "integrity" and slow.images == {}


def test_a_copy_cancelled_while_a_spooled_target_is_held_leaves_nothing(tmp_path: Path) -> None:
    cancel = threading.Event()
    chain = _Chain({"slow": "fast"})
    slow, fast = chain.held("slow", 20), MemorySite("fast")
    original = chain.ended

    def cancel_on_publish(site: str, image_id: str) -> None:
        if site == "fast":
            cancel.set()  # SIGTERM while the slow one still reads the spool
        original(site, image_id)

    chain.ended = cancel_on_publish  # type: ignore[method-assign]
    result = _copy(_Source("src"), [slow, fast], chain, _Rooms(tmp_path), cancel)
    assert result.cancelled and chain.timed_out == []
    assert slow.images == {} and _holds(fast) == DATA
    assert list(tmp_path.iterdir()) == []


def test_the_spool_hands_its_readers_what_was_written_and_waits_for_the_rest(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, base=100, chunk_size=4)
    try:
        with pytest.raises(ValueError, match="starts at 100"):
            next(spool.chunks(99, lambda: False, 0.001))
        spool.append(b"abcdef")
        got: list[bytes] = []
        reader = threading.Thread(
            target=lambda: got.extend(spool.chunks(102, lambda: False, 0.001))
        )
        reader.start()
        spool.append(b"gh")
        spool.finish()
        reader.join(HOLD)
        assert b"".join(got) == b"cdefgh" and all(len(c) <= 4 for c in got)
        stopped = threading.Event()
        stopped.set()  # a reader that has caught up returns when told to stop
        assert list(spool.chunks(108, stopped.is_set, 0.001)) == []
    finally:
        spool.close()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_spool_write_reaches_the_readers_after_the_bytes_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, base=0)
    try:
        spool.append(b"ok")

        def full(fd: int, data: bytes | memoryview, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("imagesync.spool.os.pwrite", full)
        spool.append(b"lost")
        reader = spool.chunks(0, lambda: False, 0.001)
        assert next(reader) == b"ok"
        with pytest.raises(SpoolFailed, match="No space left"):
            next(reader)
    finally:
        spool.close()
