"""The multi-hasher: hashlib's results over any chunking, failures surfaced, threads ended."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest

from imagesync.hashing import Hash, HashingError, MultiHasher, new_hash


def _hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hash-")]


def _chunks(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at random places, empty pieces included."""
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice([0, 1, 7, 2047, 2048, 4096, 65_536, 300_001, 1 << 20])
        out.append(data[pos : pos + n])
        pos += n
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("depth", [1, 3, 8])
def test_digests_equal_hashlib_over_random_chunkings(seed: int, depth: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 3_000_000))
    with MultiHasher(["sha512", "md5"], depth=depth) as h:
        for chunk in _chunks(data, rng):
            h.update(chunk)
        got = h.hexdigests()
    assert got == {
        "sha512": hashlib.sha512(data).hexdigest(),
        "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
    }
    assert not _hash_threads()


def test_nothing_hashed_is_the_empty_digest() -> None:
    with MultiHasher(["sha512"]) as h:
        assert h.hexdigests() == {"sha512": hashlib.sha512().hexdigest()}


def test_a_mutable_buffer_is_hashed_as_it_was_when_handed_over() -> None:
    buf = bytearray(b"a" * 5000)
    gate = threading.Event()

    def new(algo: str) -> Hash:
        real = new_hash(algo)

        class Slow:
            def update(self, data: bytes, /) -> None:
                gate.wait()  # the caller has reused its buffer by now
                real.update(data)

            def hexdigest(self) -> str:
                return real.hexdigest()

        return Slow()

    with MultiHasher(["sha512"], new=new) as h:
        h.update(buf)
        buf[:] = b"b" * 5000
        gate.set()
        assert h.hexdigests()["sha512"] == hashlib.sha512(b"a" * 5000).hexdigest()


def test_unknown_algorithm_or_none_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        MultiHasher(["sha512", "nope"])
    with pytest.raises(ValueError, match="at least one"):
        MultiHasher([])
    assert not _hash_threads()


class _Boom(Exception):
    pass


def _failing_md5(after: int) -> tuple[object, threading.Event]:
    """A ``new`` whose md5 fails on update number ``after``; the event is set then."""
    failed = threading.Event()

    def new(algo: str) -> Hash:
        real = new_hash(algo)
        if algo != "md5":
            return real
        calls = [0]

        class Failing:
            def update(self, data: bytes, /) -> None:
                calls[0] += 1
                if calls[0] == after:
                    failed.set()
                    raise _Boom("disk on fire")
                real.update(data)

            def hexdigest(self) -> str:
                return real.hexdigest()

        return Failing()

    return new, failed


def _update_until_raises(h: MultiHasher) -> HashingError:
    # The worker stores its error just after failing; it takes no more chunks before that,
    # so within depth + 2 updates the feeder has waited for it and sees the error.
    for _ in range(10):
        try:
            h.update(b"x" * 4096)
        except HashingError as exc:
            return exc
    raise AssertionError("the failure was never raised")


def test_a_worker_failure_is_raised_by_the_next_update() -> None:
    new, failed = _failing_md5(after=2)
    h = MultiHasher(["sha512", "md5"], depth=2, new=new)  # type: ignore[arg-type]
    h.update(b"x" * 4096)
    h.update(b"x" * 4096)
    assert failed.wait(10)
    err = _update_until_raises(h)
    assert "md5" in str(err) and "disk on fire" in str(err)
    assert isinstance(err.__cause__, _Boom)
    h.close()
    assert not _hash_threads()


def test_a_worker_failure_is_raised_by_hexdigests() -> None:
    new, _ = _failing_md5(after=1)
    h = MultiHasher(["sha512", "md5"], new=new)  # type: ignore[arg-type]
    h.update(b"x" * 4096)
    with pytest.raises(HashingError, match="md5"):
        h.hexdigests()
    assert not _hash_threads()


def test_a_failed_worker_never_blocks_the_feeder() -> None:
    """After a failure the worker keeps draining, so an update waiting for room returns and
    raises instead of hanging."""
    new, failed = _failing_md5(after=1)
    h = MultiHasher(["md5"], depth=1, new=new)  # type: ignore[arg-type]
    raised = 0
    for _ in range(50):
        try:
            h.update(b"y" * 4096)
        except HashingError:
            raised += 1
    assert failed.is_set() and raised > 0
    h.close()
    assert not _hash_threads()


def _blocking(gate: threading.Event, entered: threading.Event) -> object:
    def new(algo: str) -> Hash:
        real = new_hash(algo)

        class Blocking:
            def update(self, data: bytes, /) -> None:
                entered.set()
                gate.wait()
                real.update(data)

            def hexdigest(self) -> str:
                return real.hexdigest()

        return Blocking()

    return new


def test_update_waits_when_a_worker_is_depth_chunks_behind() -> None:
    """Memory is bounded: the caller can get only ``depth`` chunks ahead of a stuck worker
    (plus the one it is hashing)."""
    gate, entered = threading.Event(), threading.Event()
    h = MultiHasher(["sha512"], depth=3, new=_blocking(gate, entered))  # type: ignore[arg-type]
    returned = [0]

    def feed() -> None:
        for _ in range(10):
            h.update(b"z" * 4096)
            returned[0] += 1

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    assert entered.wait(10)
    worker_q = h._workers[0].q
    while not worker_q.full():  # the feeder fills the queue, then must wait
        feeder.join(0.01)
    feeder.join(0.2)
    assert feeder.is_alive()
    assert returned[0] == 1 + 3  # one being hashed, three queued
    gate.set()
    feeder.join(10)
    assert returned[0] == 10
    assert h.hexdigests()["sha512"] == hashlib.sha512(b"z" * 4096 * 10).hexdigest()
    assert not _hash_threads()


def test_close_ends_the_workers_of_an_abandoned_stream() -> None:
    """A copy that is aborted (the source failed, cancel) abandons the hasher with chunks
    queued behind a worker: close ends every thread without hashing them."""
    gate, entered = threading.Event(), threading.Event()
    h = MultiHasher(["sha512", "md5"], depth=2, new=_blocking(gate, entered))  # type: ignore[arg-type]
    for _ in range(2):
        h.update(b"w" * 4096)
    assert entered.wait(10)
    assert len(_hash_threads()) == 2
    closer = threading.Thread(target=h.close, daemon=True)
    closer.start()
    gate.set()  # the one chunk being hashed ends; the queued ones are skipped
    closer.join(10)
    assert not closer.is_alive()
    assert not _hash_threads()
    with pytest.raises(ValueError, match="closed"):
        h.update(b"more")


def test_leaving_the_with_block_on_an_error_ends_the_workers() -> None:
    def copy() -> None:
        with MultiHasher(["sha512", "md5"]) as h:
            h.update(b"v" * 10_000)
            raise KeyError("the source failed")

    with pytest.raises(KeyError):
        copy()
    assert not _hash_threads()
