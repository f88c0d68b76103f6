"""Converting on the way (imagesync.convert) over in-memory sites, with the real qemu-img
(Debian's qemu-utils, installed when missing like the other tools tests drive)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from imagesync.convert import ConversionFailed, Scratch, copy_with_formats
from imagesync.model import (
    PROP_CONVERTED_FROM,
    PROP_CONVERTED_SHA512,
    PROP_SHA512,
    ImageRecord,
)
from imagesync.retry import RetryPolicy
from imagesync.sites.memory import MemorySite
from imagesync.transfer import CopyResult, ErrorKind, new_image_for
from tests.debpkg import ensure_tool

FAST = RetryPolicy(attempts=2, base=0.0, cap=0.0)
MB = 1 << 20


@pytest.fixture(scope="module")
def qemu_img() -> Path:
    return ensure_tool("/usr/bin/qemu-img", "qemu-utils")


def make_image(tool: Path, where: Path, fmt: str, virtual: int = 4 * MB) -> bytes:
    """A small disk in ``fmt`` with real data in it (random blocks among holes)."""
    raw = where / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(virtual)
        for offset in (0, virtual // 2):
            f.seek(offset)
            f.write(os.urandom(256 * 1024))
    if fmt == "raw":
        return raw.read_bytes()
    out = where / f"disk.{fmt}"
    subprocess.run([tool, "convert", "-f", "raw", "-O", fmt, raw, out], check=True)
    return out.read_bytes()


def _add(site: MemorySite, data: bytes, fmt: str) -> ImageRecord:
    rec = site.add("img", data)
    stored = site.images[rec.id]
    stored.rec = rec.with_(disk_format=fmt)
    return stored.rec


def _copy(
    src: MemorySite,
    rec: ImageRecord,
    targets: dict[MemorySite, tuple[str, ...]],
    scratch: Scratch,
) -> CopyResult:
    new = new_image_for(rec, rec.version, "private")
    accepted = {t.name: formats for t, formats in targets.items()}
    return copy_with_formats(
        src,
        rec,
        [(t, new) for t in targets],
        accepted=lambda s: accepted[s],
        scratch=scratch,
        policy=FAST,
        sleep=lambda s: None,
    )


def _compare(tool: Path, a: bytes, fa: str, b: bytes, fb: str, tmp: Path) -> int:
    (tmp / "a").write_bytes(a)
    (tmp / "b").write_bytes(b)
    cmd: list[str | Path] = [tool, "compare", "-f", fa, "-F", fb, tmp / "a", tmp / "b"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode


def test_qcow2_to_raw_and_as_is_from_one_call(qemu_img: Path, tmp_path: Path) -> None:
    data = make_image(qemu_img, tmp_path, "qcow2")
    src, ceph, other = MemorySite("src"), MemorySite("ceph"), MemorySite("other")
    rec = _add(src, data, "qcow2")
    scratch = Scratch(tmp_path / "scratch", 64 * MB)
    result = _copy(src, rec, {ceph: ("raw",), other: ()}, scratch)
    assert result.ok, result.targets
    (plain,) = other.images.values()
    assert bytes(plain.data) == data and plain.rec.disk_format == "qcow2"
    (conv,) = ceph.images.values()
    raw = bytes(conv.data)
    own = hashlib.sha512(raw).hexdigest()
    original = hashlib.sha512(data).hexdigest()
    assert conv.rec.disk_format == "raw" and len(raw) == 4 * MB and not conv.rec.hidden
    props = conv.rec.properties
    assert props[PROP_SHA512] == original  # the version's identity: the original's bytes
    assert props[PROP_CONVERTED_FROM] == f"qcow2:{original}"
    assert props[PROP_CONVERTED_SHA512] == own == conv.rec.hashes["sha512"]
    assert conv.rec.version.same_as(rec.version) and conv.rec.provenance_ok
    assert _compare(qemu_img, data, "qcow2", raw, "raw", tmp_path) == 0
    assert list((tmp_path / "scratch").glob("convert-*")) == []  # nothing left in the scratch space


def test_raw_to_qcow2(qemu_img: Path, tmp_path: Path) -> None:
    data = make_image(qemu_img, tmp_path, "raw")
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = _add(src, data, "raw")
    result = _copy(src, rec, {dst: ("qcow2", "vmdk")}, Scratch(tmp_path / "s", 64 * MB))
    assert result.ok, result.targets
    (conv,) = dst.images.values()
    assert conv.rec.disk_format == "qcow2" and bytes(conv.data[:4]) == b"QFI\xfb"
    assert len(conv.data) < len(data)  # the holes are not stored
    assert _compare(qemu_img, data, "raw", bytes(conv.data), "qcow2", tmp_path) == 0


def test_a_scratch_too_small_says_so_before_downloading_it_all(
    qemu_img: Path, tmp_path: Path
) -> None:
    data = make_image(qemu_img, tmp_path, "qcow2", virtual=16 * MB)
    assert len(data) < 2 * MB
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = _add(src, data, "qcow2")
    # the qcow2 fits, its 16 MiB raw copy does not
    result = _copy(src, rec, {dst: ("raw",)}, Scratch(tmp_path / "s", 8 * MB))
    (t,) = result.targets
    assert not t.ok and t.error_kind is ErrorKind.CONVERSION
    assert t.error is not None and "scratch space too small" in t.error
    assert "16.0 MiB (its virtual size)" in t.error and "scratch_max_size is 8.0 MiB" in t.error
    assert t.error.startswith("converting img (qcow2 → raw): scratch space too small: it needs")
    assert "other conversions" not in t.error  # its own reservation is not someone else's
    assert dst.images == {} and list((tmp_path / "s").glob("convert-*")) == []


def test_the_disk_free_space_bounds_it_too(qemu_img: Path, tmp_path: Path) -> None:
    data = make_image(qemu_img, tmp_path, "raw")
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = _add(src, data, "raw")
    scratch = Scratch(tmp_path / "s", 64 * MB, free=lambda p: MB)
    (t,) = _copy(src, rec, {dst: ("qcow2",)}, scratch).targets
    assert t.error is not None and "its disk has only 1.0 MiB free" in t.error
    assert dst.images == {} and src.reads == 0  # refused before reading anything


def test_without_qemu_img_a_conversion_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-img on it
    src, dst, plain = MemorySite("src"), MemorySite("dst"), MemorySite("plain")
    rec = _add(src, b"x" * 1000, "qcow2")
    result = _copy(src, rec, {dst: ("raw",), plain: ()}, Scratch(tmp_path / "s", 64 * MB))
    by = {t.site: t for t in result.targets}
    assert by["plain"].ok  # a target that needs no conversion still gets its copy
    assert by["dst"].error_kind is ErrorKind.CONVERSION and by["dst"].error is not None
    assert "qemu-img is not installed" in by["dst"].error and "qemu-utils" in by["dst"].error
    assert dst.images == {}


def test_a_format_that_cannot_be_converted_is_refused(tmp_path: Path) -> None:
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = _add(src, b"x" * 1000, "iso")
    (t,) = _copy(src, rec, {dst: ("raw",)}, Scratch(tmp_path / "s", 64 * MB)).targets
    assert t.error_kind is ErrorKind.CONVERSION and "cannot be converted" in (t.error or "")
    assert src.reads == 0


def test_an_image_naming_a_backing_file_is_refused(qemu_img: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-file"
    secret.write_bytes(b"host secret" * 1000)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        [qemu_img, "create", "-f", "qcow2", "-F", "raw", "-b", secret, overlay],
        check=True,
        capture_output=True,
    )
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = _add(src, overlay.read_bytes(), "qcow2")
    (t,) = _copy(src, rec, {dst: ("raw",)}, Scratch(tmp_path / "s", 64 * MB)).targets
    assert t.error_kind is ErrorKind.CONVERSION and "names another file" in (t.error or "")
    assert dst.images == {}


def test_the_scratch_budget_is_shared_by_concurrent_conversions(tmp_path: Path) -> None:
    a, b = Scratch(tmp_path, 10 * MB), Scratch(tmp_path, 10 * MB)  # same directory
    with a.room("first") as one:
        one.need(6 * MB, "6 MiB")
        with b.room("second") as two, pytest.raises(ConversionFailed) as err:
            two.need(6 * MB, "6 MiB")
        assert "6.0 MiB of it held by other conversions" in str(err.value)
    with b.room("third") as three:
        three.need(10 * MB, "all of it")  # released when the first ended


def test_through_the_engine_a_converted_copy_is_current_and_retention_works(
    qemu_img: Path, tmp_path: Path
) -> None:
    """Two passes and two versions: each reaches the raw-only site converted, its cell is
    current (what check answers), and the old converted copy is retired like any copy."""
    import dataclasses
    import time

    from imagesync.config.types import CloudConfig, ConversionConfig
    from imagesync.engine import Engine
    from imagesync.plan import plan
    from tests.unit.memconfig import memory_config

    sites = {"c1": MemorySite("c1"), "c2": MemorySite("c2")}
    config = memory_config(tmp_path, sites, rule={"keep": 1})
    ceph = CloudConfig(name="c2", auth={}, auth_type="password", disk_formats=("raw",))
    config = dataclasses.replace(
        config,
        clouds={"c2": ceph},
        conversion=ConversionConfig(tmp_path / "scratch", 64 * MB),
    )
    engine = Engine(config, sites=sites)

    def one_pass() -> None:
        p = plan(engine.rules, engine.recover(engine.inventories()), ["c1", "c2"])
        results = engine.execute(p)
        assert all(r.ok for r in results), results
        engine.record(p.assessments, results)

    (tmp_path / "v1").mkdir()
    v1 = _add(sites["c1"], make_image(qemu_img, tmp_path / "v1", "qcow2"), "qcow2")
    v1 = sites["c1"].images[v1.id].rec = v1.with_(name="img-a")
    one_pass()
    one_pass()  # nothing more to do: the converted copy counts as the version
    assert len(sites["c2"].images) == 1
    assert [h["result"] for h in engine.state.history("img-a")] == ["ok"]
    cell = engine.state.cell("img-a", "c2")
    assert cell is not None and cell.state == "current"

    time.sleep(0.01)
    (tmp_path / "v2").mkdir()
    v2 = _add(sites["c1"], make_image(qemu_img, tmp_path / "v2", "qcow2"), "qcow2")
    sites["c1"].images[v2.id].rec = v2.with_(name="img-a")
    one_pass()  # the new version, converted
    one_pass()  # c2 is current: its old converted copy is retired (hidden)
    recs = [s.rec for s in sites["c2"].images.values()]
    assert all(r.converted and r.disk_format == "raw" for r in recs) and len(recs) == 2
    (hidden,) = [r for r in recs if r.hidden]
    assert hidden.version.same_as(v1.version)


def test_a_converted_copy_as_the_only_source_keeps_the_identity(
    qemu_img: Path, tmp_path: Path
) -> None:
    """The original is gone: the raw copy is the source, as it is to a site that takes raw and
    converted back to qcow2 for one that does not; both stay the same version."""
    data = make_image(qemu_img, tmp_path, "qcow2")
    src, ceph = MemorySite("src"), MemorySite("ceph")
    rec = _add(src, data, "qcow2")
    scratch = Scratch(tmp_path / "s", 64 * MB)
    assert _copy(src, rec, {ceph: ("raw",)}, scratch).ok
    (conv,) = ceph.images.values()
    raw_plain, back = MemorySite("raw-plain"), MemorySite("back")
    result = _copy(ceph, conv.rec, {raw_plain: (), back: ("qcow2",)}, scratch)
    assert result.ok, result.targets
    for site, fmt in ((raw_plain, "raw"), (back, "qcow2")):
        (stored,) = site.images.values()
        assert stored.rec.disk_format == fmt and stored.rec.provenance_ok
        assert stored.rec.version.same_as(rec.version)
        assert stored.rec.properties[PROP_SHA512] == hashlib.sha512(data).hexdigest()
    (copy,) = raw_plain.images.values()
    assert copy.rec.properties[PROP_CONVERTED_SHA512] == conv.rec.hashes["sha512"]


def test_rooms_a_killed_process_left_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import fcntl

    stale, live = tmp_path / "convert-stale", tmp_path / "convert-live"
    for old in (stale, live):
        old.mkdir()
        (old / "original").write_bytes(b"x" * 1000)
        (old / ".lock").touch()
    with (live / ".lock").open("w") as held:  # another process, converting now
        fcntl.flock(held, fcntl.LOCK_EX)
        with Scratch(tmp_path, 64 * MB).room("next") as room:
            assert room.path.exists()
            assert not stale.exists() and (live / "original").exists()
    assert sorted(p.name for p in tmp_path.glob("convert-*")) == ["convert-live"]


def test_another_process_s_conversion_counts_against_the_bound(tmp_path: Path) -> None:
    import fcntl

    live = tmp_path / "convert-other"  # the daemon converting while a push runs
    live.mkdir()
    (live / ".reserved").write_text(str(6 * MB))
    with (live / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with Scratch(tmp_path, 10 * MB).room("push") as room, pytest.raises(ConversionFailed):
            room.need(6 * MB, "6 MiB")
    with Scratch(tmp_path, 10 * MB).room("push") as room:
        room.need(6 * MB, "6 MiB")  # that process is gone: its room no longer counts


def test_a_failed_download_is_retried_and_corrupt_bytes_are_never_converted(
    qemu_img: Path, tmp_path: Path
) -> None:
    from imagesync.errors import TransientError
    from imagesync.sites.memory import Faults

    data = make_image(qemu_img, tmp_path, "qcow2")
    fails = [1]

    def once(op: str, image_id: str | None) -> None:
        if op == "open" and fails:
            fails.pop()
            raise TransientError("connection reset")

    src, dst = MemorySite("src", Faults(hook=once)), MemorySite("dst")
    rec = _add(src, data, "qcow2")
    assert _copy(src, rec, {dst: ("raw",)}, Scratch(tmp_path / "s", 64 * MB)).ok
    assert src.reads == 1 and len(dst.images) == 1  # the second open read it

    bad, dst2 = MemorySite("bad", Faults(corrupt_read=True)), MemorySite("dst2")
    rec = _add(bad, data, "qcow2")
    (t,) = _copy(bad, rec, {dst2: ("raw",)}, Scratch(tmp_path / "s", 64 * MB)).targets
    assert t.error_kind is ErrorKind.CONVERSION and "are not the version's" in (t.error or "")
    assert dst2.images == {}


def test_a_conversion_qemu_img_compare_rejects_is_never_uploaded(
    qemu_img: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagesync.convert as convert

    real = convert._run

    def differ(args: list[str], cancel: object, ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
        if args[1] == "compare":  # as if convert had written other data: compare with that
            other = tmp_path / "other.raw"
            other.write_bytes(os.urandom(4 * MB))
            tool, _, f, fa, big_f, _fb, original, _converted = args
            args = [tool, "compare", f, fa, big_f, "raw", original, str(other)]
        return real(args, None, ok)

    monkeypatch.setattr(convert, "_run", differ)
    data = make_image(qemu_img, tmp_path, "qcow2")
    src, dst = MemorySite("src"), MemorySite("dst")
    rec = _add(src, data, "qcow2")
    (t,) = _copy(src, rec, {dst: ("raw",)}, Scratch(tmp_path / "s", 64 * MB)).targets
    assert t.error_kind is ErrorKind.CONVERSION and "qemu-img compare found" in (t.error or "")
    assert dst.images == {}


def test_a_bug_fails_the_converted_targets_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagesync.convert as convert

    def broken() -> str:
        raise KeyError("bug")

    monkeypatch.setattr(convert, "qemu_img", broken)
    src, dst, plain = MemorySite("src"), MemorySite("dst"), MemorySite("plain")
    rec = _add(src, b"x" * 1000, "qcow2")
    result = _copy(src, rec, {dst: ("raw",), plain: ()}, Scratch(tmp_path / "s", 64 * MB))
    by = {t.site: t for t in result.targets}
    assert by["plain"].ok and by["dst"].error_kind is ErrorKind.UNEXPECTED
