"""Versions with provenance, honest hash comparison, time parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from imagesync.model import (
    PROP_ORIGIN,
    PROP_SHA512,
    PROP_STATE,
    PROP_VERSION,
    ImageRecord,
    format_time,
    hashes_agree,
    parse_time,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SHA = "a" * 128


def rec(**kw: object) -> ImageRecord:
    base: dict[str, object] = dict(
        site="c1", id="id1", name="img", status="active", created_at=T0, size=10
    )
    base.update(kw)
    return ImageRecord(**base)  # type: ignore[arg-type]


def test_uploaded_by_a_person_is_its_own_origin() -> None:
    r = rec(hashes={"sha512": SHA, "md5": "b" * 32})
    v = r.version
    assert v.origin == "c1:id1"
    assert v.time == T0
    assert v.sha512 == SHA


def test_md5_only_image_has_unknown_sha512() -> None:
    assert rec(hashes={"md5": "b" * 32}).version.sha512 is None


def test_copy_carries_the_originals_version() -> None:
    later = T0 + timedelta(days=3)
    copy = rec(
        site="c2",
        id="x",
        created_at=later,
        properties={PROP_ORIGIN: "c1:id1", PROP_VERSION: format_time(T0), PROP_SHA512: SHA},
    )
    assert copy.version.origin == "c1:id1"
    assert copy.version.time == T0
    assert copy.version.same_as(rec(hashes={"sha512": SHA}).version)


def test_a_copy_never_looks_newer_than_it_was_made() -> None:
    copy = rec(
        created_at=T0,
        properties={PROP_ORIGIN: "c9:z", PROP_VERSION: format_time(T0 + timedelta(days=1))},
    )
    assert copy.version.time == T0


def test_ties_are_broken_by_sha512() -> None:
    a = rec(id="a", hashes={"sha512": "1" * 128}).version
    b = rec(id="b", hashes={"sha512": "2" * 128}).version
    assert max([a, b], key=lambda v: v.key()) is b
    assert max([b, a], key=lambda v: v.key()) is b


def test_in_progress_and_inactive_images_do_not_count() -> None:
    assert not rec(properties={PROP_STATE: "uploading"}).counts
    assert not rec(status="queued").counts
    assert rec().counts


def test_volume_backed_snapshot_is_not_copyable() -> None:
    r = rec(size=0, properties={"block_device_mapping": "[...]"})
    assert r.not_copyable_reason is not None
    assert "volume-backed" in r.not_copyable_reason
    assert rec().not_copyable_reason is None


def test_unknown_hash_is_not_equal() -> None:
    assert hashes_agree({"md5": "a" * 32}, {"sha512": SHA}) is None
    assert hashes_agree({"sha512": SHA, "md5": "x"}, {"sha512": SHA}) is True
    assert hashes_agree({"sha512": SHA}, {"sha512": "b" * 128}) is False


def test_parse_time_handles_glance_and_z() -> None:
    assert parse_time("2026-01-01T00:00:00Z") == T0
    assert parse_time("2026-01-01T00:00:00+00:00") == T0
    assert parse_time("2026-01-01T00:00:00") == T0
    assert parse_time("garbage") is None
    assert format_time(T0) == "2026-01-01T00:00:00Z"
