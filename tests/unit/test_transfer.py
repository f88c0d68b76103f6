"""The streaming copy engine against injected in-memory sites with fault injection."""

from __future__ import annotations

import hashlib
import os

import pytest

from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_STATE, PROP_VERSION
from imagesync.retry import RetryPolicy
from imagesync.sites.memory import Faults, MemorySite
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

    made = []
    real = hashlib.md5

    def counting_md5(*a: object, **kw: object) -> object:
        made.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    import types

    # a stand-in hashlib for transfer.py alone (the sites hash with the real one)
    fake = types.SimpleNamespace(sha512=hashlib.sha512, md5=counting_md5)
    monkeypatch.setattr(transfer, "hashlib", fake)
    _copy(MemorySite("src"), [MemorySite("t1")])  # both sides report sha512: md5 decides nothing
    assert made == []
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = src.add("img", DATA, hashes={"md5": real(DATA).hexdigest()})  # md5-only source
    result = copy_image(src, rec, [(dst, new_image_for(rec, rec.version, "private"))], policy=FAST)
    assert result.ok and made == [1]


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
