"""The streaming copy engine against injected in-memory sites with fault injection."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import pytest
from structlog.testing import capture_logs

from imagesync.errors import TransientError
from imagesync.model import (
    PROP_ORIGIN,
    PROP_SHA512,
    PROP_STATE,
    PROP_VERSION,
    ImageRecord,
    NewImage,
)
from imagesync.retry import RetryPolicy
from imagesync.sites.directory import DirectorySite, _DirWriter
from imagesync.sites.memory import Faults, MemorySite, MemoryWriter
from imagesync.transfer import copy_image, new_image_for

DATA = os.urandom(250_000)
FAST = RetryPolicy(attempts=3, base=0.0, cap=0.0)


def _copy(src: MemorySite, targets: list[MemorySite]):  # type: ignore[no-untyped-def]
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    return rec, copy_image(src, rec, [(t, new) for t in targets], policy=FAST, sleep=lambda s: None)


def test_fan_out_reads_the_source_once_and_sets_provenance() -> None:
    src, targets = MemorySite("src"), [MemorySite(f"t{i}") for i in range(3)]
    rec, result = _copy(src, targets)
    assert result.ok and src.reads == 1
    assert result.sha512 == hashlib.sha512(DATA).hexdigest()
    for t in targets:
        (stored,) = t.images.values()
        assert bytes(stored.data) == DATA
        props = stored.rec.properties
        assert props[PROP_ORIGIN] == rec.ref
        assert props[PROP_SHA512] == result.sha512
        assert PROP_VERSION in props and PROP_STATE not in props
        assert not stored.rec.hidden


def test_a_target_storing_wrong_bytes_is_removed_and_others_keep_theirs() -> None:
    src, good = MemorySite("src"), MemorySite("good")
    bad = MemorySite("bad", Faults(flip_byte_on_store=True))
    _, result = _copy(src, [good, bad])
    by_site = {t.site: t for t in result.targets}
    assert by_site["good"].ok
    assert not by_site["bad"].ok and by_site["bad"].error_kind == "integrity"
    assert bad.images == {}
    assert len(good.images) == 1


def test_source_delivering_wrong_bytes_leaves_nothing_anywhere() -> None:
    src = MemorySite("src", Faults(corrupt_read=True))
    targets = [MemorySite("t1"), MemorySite("t2")]
    _, result = _copy(src, targets)
    assert not result.ok
    assert all(t.error_kind == "integrity" for t in result.targets)
    assert all(t.images == {} for t in targets)


def test_transient_write_failure_is_retried_for_that_target_only() -> None:
    src = MemorySite("src")
    flaky = MemorySite("flaky", Faults(fail_write_after=100_000, fail_write_times=1))
    steady = MemorySite("steady")
    _, result = _copy(src, [flaky, steady])
    assert result.ok
    by_site = {t.site: t for t in result.targets}
    assert by_site["flaky"].attempts == 2
    assert src.reads == 2  # the retry re-reads the source for the failed target alone
    assert len(flaky.images) == 1 and len(steady.images) == 1


def test_persistent_failure_gives_up_cleanly() -> None:
    src = MemorySite("src")
    dead = MemorySite("dead", Faults(fail_write_after=1000, fail_write_times=99))
    _, result = _copy(src, [dead])
    (t,) = result.targets
    assert not t.ok and t.attempts == 3 and t.error_kind == "transient"
    assert dead.images == {}


def test_non_transient_failure_is_not_retried() -> None:
    src = MemorySite("src")
    full = MemorySite(
        "full", Faults(fail_write_after=1000, fail_write_times=99, fail_write_transient=False)
    )
    _, result = _copy(src, [full])
    assert result.targets[0].attempts == 1 and full.images == {}


def test_source_without_sha512_gets_it_computed_on_first_copy() -> None:
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = src.add("img", DATA, hashes={"md5": hashlib.md5(DATA).hexdigest()})
    assert rec.version.sha512 is None
    result = copy_image(src, rec, [(dst, new_image_for(rec, rec.version, "private"))], policy=FAST)
    assert result.ok
    (stored,) = dst.images.values()
    assert stored.rec.properties[PROP_SHA512] == hashlib.sha512(DATA).hexdigest()


def test_source_md5_mismatch_is_an_integrity_error() -> None:
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = src.add("img", DATA, hashes={"md5": "0" * 32})
    result = copy_image(src, rec, [(dst, new_image_for(rec, rec.version, "private"))], policy=FAST)
    assert result.targets[0].error_kind == "integrity" and dst.images == {}


def test_md5_is_computed_only_when_it_can_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    import imagesync.transfer as transfer
    from imagesync.hashing import MultiHasher

    made: list[list[str]] = []

    def recording(algorithms: list[str]) -> MultiHasher:
        made.append(list(algorithms))
        return MultiHasher(algorithms)

    # the hasher transfer.py makes (the sites hash with their own)
    monkeypatch.setattr(transfer, "MultiHasher", recording)
    _copy(MemorySite("src"), [MemorySite("t1")])  # both sides report sha512: md5 decides nothing
    assert made == [["sha512"]]
    src, dst = MemorySite("src"), MemorySite("dst")
    real = hashlib.md5(DATA, usedforsecurity=False).hexdigest()
    rec = src.add("img", DATA, hashes={"md5": real})  # md5-only source
    result = copy_image(src, rec, [(dst, new_image_for(rec, rec.version, "private"))], policy=FAST)
    assert result.ok and made == [["sha512"], ["sha512", "md5"]]


def test_a_copy_retry_waits_as_long_as_the_site_asked() -> None:
    """503 + Retry-After on an upload: the copy's retry honours the hint (one retry path)."""
    from imagesync.errors import TransientError

    class Throttled(MemorySite):
        refused = 0

        def create(self, new):  # type: ignore[no-untyped-def]
            writer = super().create(new)
            if Throttled.refused == 0:
                Throttled.refused += 1

                def refuse(chunk: bytes) -> None:
                    raise TransientError("503 Service Unavailable", site=self.name, retry_after=7.0)

                writer.write = refuse  # type: ignore[method-assign]
            return writer

    src, target = MemorySite("src"), Throttled("throttled")
    rec = src.add("img", DATA)
    waits: list[float] = []
    result = copy_image(
        src,
        rec,
        [(target, new_image_for(rec, rec.version, "private"))],
        policy=RetryPolicy(attempts=3, base=0.0, cap=0.0),
        sleep=waits.append,
    )
    assert result.ok and result.targets[0].attempts == 2
    assert waits == [7.0]


# -- one failed target never blocks the others (issue 8, item 8) -----------------------------


class _Recording(MemorySite):
    """A target that counts how each upload ended: a Glance writer's upload thread waits for
    exactly one of finish or abort, and blocks forever when it gets neither."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ended: list[str] = []

    def create(self, new: NewImage) -> MemoryWriter:
        writer = super().create(new)
        finish, abort = writer.finish, writer.abort

        def on_finish() -> ImageRecord:
            self.ended.append("finish")
            return finish()

        def on_abort() -> None:
            self.ended.append("abort")
            abort()

        writer.finish = on_finish  # type: ignore[method-assign]
        writer.abort = on_abort  # type: ignore[method-assign]
        return writer


class _FullDisk:
    """Stands in for the directory writer's open file on a disk that fills up: at ``where``
    ("write": the second chunk; "close": the deferred write-back NFS reports at close)."""

    def __init__(self, f: BinaryIO, where: str) -> None:
        self.f, self.where, self.writes = f, where, 0

    def _full(self) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, chunk: bytes) -> int:
        self.writes += 1
        if self.where == "write" and self.writes > 1:
            raise self._full()
        return self.f.write(chunk)

    def flush(self) -> None:
        if self.where == "close":
            raise self._full()
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        if self.where == "close":
            raise self._full()


@pytest.mark.parametrize("where", ["write", "close", "fsync"])
def test_a_full_directory_store_fails_alone_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    class FillingUp(DirectorySite):
        def create(self, new: NewImage) -> _DirWriter:
            w = super().create(new)
            if where != "fsync":
                w._f = _FullDisk(w._f, where)  # type: ignore[arg-type,assignment]
            return w

    if where == "fsync":

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)
    src, mem, last = MemorySite("src"), MemorySite("mem"), _Recording("last")
    store = FillingUp("dir", tmp_path)
    rec = src.add("img", os.urandom(3 << 20))  # three chunks
    new = new_image_for(rec, rec.version, "private")
    result = copy_image(src, rec, [(mem, new), (store, new), (last, new)], policy=FAST)
    by_site = {t.site: t for t in result.targets}
    assert by_site["mem"].ok and len(mem.images) == 1
    assert by_site["last"].ok and last.ended == ["finish"]
    assert not by_site["dir"].ok and by_site["dir"].error_kind == "site"
    assert "No space left" in (by_site["dir"].error or "")
    assert list(tmp_path.rglob("*")) == []  # no .partial, no .tmp, no marker


class _Buggy(MemorySite):
    """A site with a bug: an exception outside the SiteError hierarchy at ``where``."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__(name)
        self.where = where
        self.aborted = 0

    def create(self, new: NewImage) -> MemoryWriter:
        if self.where == "create":
            raise ValueError("bug in create")
        writer = super().create(new)
        abort = writer.abort

        def boom(*a: object) -> ImageRecord:
            raise OSError(errno.EIO, f"bug in {self.where}")

        def counted_abort() -> None:
            self.aborted += 1
            abort()
            if self.where == "abort":
                raise RuntimeError("bug in abort")

        if self.where in ("write", "abort"):
            writer.write = boom  # type: ignore[method-assign,assignment]
        if self.where == "finish":
            writer.finish = boom  # type: ignore[method-assign]
        writer.abort = counted_abort  # type: ignore[method-assign]
        return writer

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        if self.where == "publish":
            raise KeyError("bug in publish")
        return super().publish(image_id, properties)


@pytest.mark.parametrize("where", ["create", "write", "finish", "publish", "abort"])
def test_an_exception_outside_the_hierarchy_fails_that_target_only(where: str) -> None:
    src, first, last = MemorySite("src"), MemorySite("first"), _Recording("last")
    buggy = _Buggy("buggy", where)
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    with capture_logs() as logs:
        result = copy_image(src, rec, [(first, new), (buggy, new), (last, new)], policy=FAST)
    by_site = {t.site: t for t in result.targets}
    assert by_site["first"].ok and by_site["last"].ok and last.ended == ["finish"]
    bad = by_site["buggy"]
    assert not bad.ok and bad.error_kind == "unexpected" and f"bug in {where}" in (bad.error or "")
    assert bad.attempts == 1  # a bug is not retried
    assert buggy.images == {}  # removed (abort, or delete after finish)
    if where in ("write", "finish", "abort"):
        assert buggy.aborted == 1
    assert any(e["event"] == "copy.target_failed" and e["site"] == "buggy" for e in logs)


def test_a_source_failing_outside_the_hierarchy_aborts_every_target() -> None:
    class BadSource(MemorySite):
        def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
            yield b"x" * 1000
            raise OSError(errno.EIO, "Input/output error")

    src, a, b = BadSource("src"), _Recording("a"), _Recording("b")
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    result = copy_image(src, rec, [(a, new), (b, new)], policy=FAST)
    assert not result.ok
    assert all(t.error_kind == "unexpected" for t in result.targets)
    assert a.ended == ["abort"] and b.ended == ["abort"]
    assert a.images == {} and b.images == {}


class _PublishFails(MemorySite):
    """Publishing fails for the caller: after the site published (``applied``: the answer was
    lost on the way back), or before; ``blind``: reading the image back fails too."""

    def __init__(self, name: str, *, applied: bool, blind: bool = False) -> None:
        super().__init__(name)
        self.applied = applied
        self.blind = blind
        self.deletes: list[str] = []

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        if self.applied:
            super().publish(image_id, properties)
        raise TransientError("connection reset by peer", site=self.name)

    def get_image(self, image_id: str) -> ImageRecord:
        if self.blind:
            raise TransientError("503 Service Unavailable", site=self.name)
        return super().get_image(image_id)

    def delete(self, image_id: str) -> None:
        self.deletes.append(image_id)
        super().delete(image_id)


class _Watcher:
    def __init__(self) -> None:
        self.leased: set[str] = set()

    def started(self, site: str, image_id: str) -> None:
        self.leased.add(image_id)

    def ended(self, site: str, image_id: str) -> None:
        self.leased.discard(image_id)


def test_a_publish_whose_answer_was_lost_keeps_the_published_copy() -> None:
    """Found by the fault suite (tests/faults.py): the answer to Glance's publish update was
    lost after Glance applied it, and the copy, published and visible, was deleted."""
    src, target = MemorySite("src"), _PublishFails("t", applied=True)
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    watcher = _Watcher()
    result = copy_image(src, rec, [(target, new)], policy=FAST, watcher=watcher)
    (stored,) = target.images.values()
    assert target.deletes == [] and stored.published and bytes(stored.data) == DATA
    assert result.ok and result.targets[0].image is not None
    assert result.targets[0].image.id == stored.rec.id and not result.targets[0].image.in_progress
    assert watcher.leased == set()


def test_a_publish_that_failed_before_it_happened_removes_the_upload() -> None:
    src, target = MemorySite("src"), _PublishFails("t", applied=False)
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    watcher = _Watcher()
    result = copy_image(src, rec, [(target, new)], policy=RetryPolicy(attempts=1), watcher=watcher)
    assert not result.ok and result.targets[0].error_kind == "transient"
    assert target.images == {} and len(target.deletes) == 1 and watcher.leased == set()


def test_a_failed_publish_that_cannot_be_told_is_left_to_recovery() -> None:
    """Neither the publish nor reading the image back answered: it may be published, so it
    is not deleted blind. It stays marked and leased; recovery re-reads it under the lock."""
    src, target = MemorySite("src"), _PublishFails("t", applied=False, blind=True)
    rec = src.add("img", DATA)
    new = new_image_for(rec, rec.version, "private")
    watcher = _Watcher()
    result = copy_image(src, rec, [(target, new)], policy=RetryPolicy(attempts=1), watcher=watcher)
    assert not result.ok and result.targets[0].error_kind == "transient"
    (stored,) = target.images.values()
    assert target.deletes == [] and not stored.published
    assert watcher.leased == {stored.rec.id}


def test_no_hashing_thread_outlives_a_copy_whose_source_failed() -> None:
    """Each algorithm hashes in a thread of its own (imagesync.hashing): a read cut part-way
    abandons the hasher, and its threads end with the attempt (every retry included)."""
    import threading

    class Cut(MemorySite):
        def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
            stream = super().open(image, offset)
            yield next(stream)
            raise TransientError("connection reset", site=self.name)

    src, dst = Cut("src"), MemorySite("dst")
    rec = src.add("img", DATA * 8, hashes={"md5": hashlib.md5(DATA * 8).hexdigest()})
    result = copy_image(src, rec, [(dst, new_image_for(rec, rec.version, "private"))], policy=FAST)
    assert not result.ok
    assert result.targets[0].attempts == FAST.attempts
    assert not [t for t in threading.enumerate() if t.name.startswith("hash-")]
    assert dst.list_images() == []


def test_the_targets_images_are_created_side_by_side() -> None:
    """Each target's create waits until every other target's has begun: one after another,
    the first would wait in vain (a broken barrier fails it)."""
    barrier = threading.Barrier(3, timeout=2)

    def meet(op: str, image_id: str | None) -> None:
        if op == "create":
            barrier.wait()

    targets = [MemorySite(f"t{i}", Faults(hook=meet)) for i in range(3)]
    _, result = _copy(MemorySite("src"), targets)
    assert result.ok, [t.error for t in result.targets]
    assert all(t.attempts == 1 for t in result.targets)
    assert all(len(t.images) == 1 for t in targets)
