"""Versions with provenance, honest hash comparison, time parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from imagesync.model import (
    PROP_ORIGIN,
    PROP_STATE,
    ImageRecord,
    SiteInventory,
    format_time,
    hashes_agree,
    parse_time,
    printable,
)
from tests.unit.marks import copy_marks

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
    copy = rec(site="c2", id="x", created_at=later, properties=copy_marks("c1:id1", T0, SHA))
    assert copy.version.origin == "c1:id1"
    assert copy.version.time == T0
    assert copy.version.same_as(rec(hashes={"sha512": SHA}).version)


def test_a_copy_never_looks_newer_than_it_was_made() -> None:
    copy = rec(
        created_at=T0,
        properties=copy_marks("c9:z", T0 + timedelta(days=1)),
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


COPY_PROPS = copy_marks("c1:id1", T0, SHA)
SNAP_SHA = "c" * 128


def test_a_nova_snapshot_of_a_copy_is_an_original() -> None:
    # Nova copied the base image's properties, imagesync's marks included
    later = T0 + timedelta(days=2)
    snap = rec(
        site="c2",
        id="snap",
        created_at=later,
        hashes={"sha512": SNAP_SHA},
        properties={**COPY_PROPS, "image_type": "snapshot", "instance_uuid": "i-1"},
    )
    assert not snap.provenance_ok
    v = snap.version
    assert (v.origin, v.time, v.sha512) == ("c2:snap", later, SNAP_SHA)


def test_instance_uuid_alone_marks_an_image_nova_made() -> None:
    backup = rec(hashes={"sha512": SHA}, properties={**COPY_PROPS, "instance_uuid": "i-1"})
    assert not backup.provenance_ok and backup.version.origin == backup.ref


def test_marks_contradicted_by_the_sites_own_hash_do_not_count() -> None:
    changed = rec(id="x", hashes={"sha512": SNAP_SHA}, properties=COPY_PROPS)
    assert not changed.provenance_ok
    assert changed.version.origin == changed.ref and changed.version.sha512 == SNAP_SHA


def test_a_consistent_copy_keeps_its_provenance() -> None:
    copy = rec(
        id="x", created_at=T0 + timedelta(days=1), hashes={"sha512": SHA}, properties=COPY_PROPS
    )
    assert copy.provenance_ok and copy.version.origin == "c1:id1"
    # a copy still being written has no hash of its own yet
    assert rec(id="y", properties={PROP_ORIGIN: "c1:id1", PROP_STATE: "uploading"}).provenance_ok


def test_a_copy_of_a_snapshot_does_not_carry_novas_server_marks() -> None:
    # else the copy would look like a snapshot on its cloud, a version of its own, forever
    snap = rec(properties={"image_type": "snapshot", "instance_uuid": "i", "os_distro": "alma"})
    assert snap.user_properties() == {"os_distro": "alma"}


def test_first_seen_orders_versions_before_creation_time() -> None:
    early = rec(id="a", created_at=T0 + timedelta(hours=2), first_seen=T0 + timedelta(days=1))
    late = rec(id="b", created_at=T0, first_seen=T0 + timedelta(days=2))
    assert max([early.version, late.version], key=lambda v: v.key()).origin == "c1:b"


def test_trust_by_owner() -> None:
    mine, theirs = rec(id="m", owner="p1"), rec(id="t", owner="p2")
    inv = SiteInventory("c1", (mine, theirs), trusted_owners=frozenset({"p1"}))
    assert inv.trusted("img") == [mine] and inv.foreign("img") == [theirs]
    store = SiteInventory("c1", (mine, theirs))
    assert store.trusted("img") == [mine, theirs]


def test_printable_escapes_terminal_control_sequences() -> None:
    assert printable("canfar-el9") == "canfar-el9"
    assert printable("x\x1b]0;owned\x07\r\u202eok") == "x\\x1b]0;owned\\x07\\x0d\\u202eok"
    assert printable("ümlaut 日本 a b") == "ümlaut 日本 a b"
