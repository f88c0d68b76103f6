"""The directory store's own rules: safe names, the layout on disk, nothing half-made after
abort, and the sentences its connection check gives. (What every site does is in
tests/contract.)"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imagesync.errors import NotFound, SiteError, TransientError
from imagesync.model import ImageRecord, NewImage
from imagesync.retry import RetryPolicy
from imagesync.sites.directory import DirectorySite, _DirWriter, check_name
from imagesync.sites.memory import MemorySite
from imagesync.transfer import copy_image, new_image_for


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../etc", "a/b", "a\\b", "x\0y", ".hidden", "tab\tname", "x" * 256]
)
def test_unsafe_names_are_rejected(name: str) -> None:
    with pytest.raises(SiteError):
        check_name(name)


def test_unsafe_name_cannot_create(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    with pytest.raises(SiteError):
        site.create(NewImage("../escape", "raw", "bare", 0, 0, {}, 3))
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "escape").exists()


def test_a_published_image_is_one_data_file_and_one_metadata_file(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    w = site.create(NewImage("img", "raw", "bare", 0, 0, {"k": "v"}, 3))
    w.write(b"abc")
    rec = w.finish()
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        f".{rec.id}.img.partial",
        f".{rec.id}.json",
    ]
    site.publish(rec.id, {"imagesync.sha512": "f" * 128})
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        f"{rec.id}.img",
        f"{rec.id}.json",
    ]
    assert (tmp_path / "img" / f"{rec.id}.img").read_bytes() == b"abc"


def test_abort_leaves_nothing_on_disk(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    w = site.create(NewImage("img", "raw", "bare", 0, 0, {}, 3))
    w.write(b"ab")
    w.abort()
    assert list(tmp_path.rglob("*")) == []


def test_deleting_an_upload_killed_before_its_record_removes_its_leftovers(
    tmp_path: Path,
) -> None:
    # Found by the fault suite: a kill inside finish() (its metadata half-written) left the
    # data and a temporary file and no record; recovery's delete by id left them forever.
    site = DirectorySite("s", tmp_path)
    w = site.create(NewImage("img", "raw", "bare", 0, 0, {}, 3))
    w.write(b"abc")
    image_id = w.image_id
    folder = tmp_path / "img"
    for meta in folder.glob(f".{image_id}.json"):
        meta.rename(folder / f"..{image_id}.json.01af3138.tmp")  # as a kill mid-write leaves it
    (folder / f"..{image_id}.json.01af3138.tmp").touch()
    with pytest.raises(NotFound):
        site.get_image(image_id)
    site.delete(image_id)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


def test_an_id_that_could_escape_the_folder_is_not_found(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    with pytest.raises(NotFound):
        site.get_image("../../etc/passwd")


def test_check_connection_says_what_to_fix(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert DirectorySite("s", tmp_path).check_connection() == f"writable directory {tmp_path}"
    with pytest.raises(SiteError, match=r"does not exist: create it \(mkdir -p .*/missing\)"):
        DirectorySite("s", tmp_path / "missing").check_connection()
    with pytest.raises(SiteError, match="is not a directory"):
        DirectorySite("s", tmp_path / "file").check_connection()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe file is gone


# -- bad disks and bad input (issue 8, item 8) -----------------------------------------------


def _new(name: str = "img") -> NewImage:
    return NewImage(name, "raw", "bare", 0, 0, {}, None)


def _stored(site: DirectorySite, name: str = "img", data: bytes = b"abc") -> str:
    w = site.create(_new(name))
    w.write(data)
    rec = w.finish()
    site.publish(rec.id, {})
    return rec.id


def test_a_multibyte_name_too_long_in_bytes_is_rejected_cleanly(tmp_path: Path) -> None:
    name = "é" * 200  # 200 characters, 400 bytes in UTF-8: over NAME_MAX (255 bytes)
    with pytest.raises(SiteError, match="400 bytes"):
        check_name(name)
    site = DirectorySite("s", tmp_path)
    with pytest.raises(SiteError, match="400 bytes"):
        site.create(_new(name))
    with pytest.raises(SiteError, match="400 bytes"):
        site.list_images(name)
    assert list(tmp_path.iterdir()) == []
    check_name("é" * 127)  # 254 bytes: fine


def test_a_name_that_is_not_unicode_text_is_rejected_as_a_site_error() -> None:
    with pytest.raises(SiteError, match="UTF-8"):
        check_name("bad\udcffname")  # a lone surrogate (undecodable bytes from a listing)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"id": "x"}', b'{"id": "x", "name": "img", "size": "big"}'],
)
def test_a_malformed_metadata_file_is_quarantined_and_reported(
    tmp_path: Path, content: bytes
) -> None:
    site = DirectorySite("s", tmp_path)
    good = _stored(site)
    bad = _stored(site)
    (tmp_path / "img" / f"{bad}.json").write_bytes(content)
    with capture_logs() as logs:
        listed = site.list_images()
    assert [r.id for r in listed] == [good]
    names = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert f"{bad}.json" not in names
    (aside,) = [n for n in names if n.startswith(f"{bad}.json.bad-")]
    assert (tmp_path / "img" / aside).read_bytes() == content  # kept for the operator
    (event,) = [e for e in logs if e["event"] == "directory.metadata_quarantined"]
    assert event["moved_to"].endswith(aside) and event["site"] == "s"
    assert [r.id for r in site.list_images("img")] == [good]  # and it stays out of the way


def test_a_malformed_upload_marker_does_not_break_the_listing(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    good = _stored(site)
    w = site.create(_new())
    (tmp_path / "img" / f".{w.image_id}.json").write_bytes(b"\x00garbage")
    assert [r.id for r in site.list_images()] == [good]


def test_malformed_metadata_is_a_site_error_everywhere_else(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    image_id = _stored(site)
    (tmp_path / "img" / f"{image_id}.json").write_bytes(b"{oops")
    with pytest.raises(SiteError, match="malformed"):
        site.get_image(image_id)
    with pytest.raises(SiteError, match="malformed"):
        site.hide(image_id)
    w = site.create(_new())
    w.write(b"x")
    rec = w.finish()
    (tmp_path / "img" / f".{rec.id}.json").write_bytes(b"[]")
    with pytest.raises(SiteError, match="malformed"):
        site.get_image(rec.id)
    with pytest.raises(SiteError, match="malformed"):
        site.publish(rec.id, {})


def test_the_stored_hash_is_read_back_from_disk(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    w = site.create(_new())
    w.write(b"hello world")
    partial = tmp_path / "img" / f".{w.image_id}.img.partial"
    assert w._f is not None
    w._f.flush()  # the bytes reach the file; then the disk flips one
    raw = bytearray(partial.read_bytes())
    raw[0] ^= 0x01
    partial.write_bytes(bytes(raw))
    rec = w.finish()
    assert rec.hashes["sha512"] == hashlib.sha512(bytes(raw)).hexdigest()
    assert rec.hashes["sha512"] != hashlib.sha512(b"hello world").hexdigest()
    assert rec.size == len(raw)


def test_a_flipped_byte_on_disk_fails_the_copy_and_leaves_nothing(tmp_path: Path) -> None:
    class Flipping(DirectorySite):
        def create(self, new: NewImage) -> _DirWriter:
            w = super().create(new)
            real = w.finish

            def finish() -> ImageRecord:
                w._f.flush()  # type: ignore[union-attr]
                with open(w.partial, "r+b") as f:
                    f.seek(10)
                    byte = f.read(1)
                    f.seek(10)
                    f.write(bytes([byte[0] ^ 0xFF]))
                return real()

            w.finish = finish  # type: ignore[method-assign]
            return w

    src, mem, flip = MemorySite("src"), MemorySite("mem"), Flipping("dir", tmp_path)
    rec = src.add("img", os.urandom(100_000))
    new = new_image_for(rec, rec.version, "private")
    result = copy_image(src, rec, [(mem, new), (flip, new)], policy=RetryPolicy(attempts=1))
    by_site = {t.site: t for t in result.targets}
    assert by_site["mem"].ok
    assert by_site["dir"].error_kind == "integrity"
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("err", [errno.EIO, errno.ESTALE])
def test_nfs_troubles_are_transient(tmp_path: Path, err: int) -> None:
    site = DirectorySite("s", tmp_path)
    image_id = _stored(site)

    def broken(self: Path) -> bytes:
        raise OSError(err, os.strerror(err))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "read_bytes", broken)
        with pytest.raises(TransientError):
            site.list_images()
        with pytest.raises(TransientError):
            site.get_image(image_id)


@pytest.mark.parametrize(
    ("err", "hint"),
    [
        (errno.EACCES, "permission"),
        (errno.ENOSPC, "full"),
        (errno.ENAMETOOLONG, "too long"),
        (errno.EIO, "I/O"),
    ],
)
def test_every_os_error_of_create_is_a_site_error(tmp_path: Path, err: int, hint: str) -> None:
    site = DirectorySite("s", tmp_path)

    def refuse(*a: object, **kw: object) -> int:
        raise OSError(err, os.strerror(err))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", refuse)
        mp.setattr("builtins.open", refuse)
        with pytest.raises(SiteError, match=hint):
            site.create(_new())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_reading_an_image_that_fails_midway_is_a_site_error(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    image_id = _stored(site, data=b"x" * (3 << 20))
    rec = site.get_image(image_id)
    real_open = open

    class Failing:
        """The image file, whose second read fails as a dying disk (or a soft NFS mount) does."""

        def __init__(self, f: io.BufferedReader) -> None:
            self.f, self.reads = f, 0

        def __enter__(self) -> Failing:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, n: int = -1) -> bytes:
            self.reads += 1
            if self.reads > 1:
                raise OSError(errno.EIO, "Input/output error")
            return self.f.read(n)

        def seek(self, n: int) -> int:
            return self.f.seek(n)

        def close(self) -> None:
            self.f.close()

    def failing_open(path: object, mode: str = "r", *a: object, **kw: object) -> object:
        return Failing(real_open(path, mode))  # type: ignore[call-overload]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("builtins.open", failing_open)
        stream = site.open(rec)
        with pytest.raises(TransientError, match="reading"):
            list(stream)


def test_a_failed_metadata_write_leaves_no_temp_file(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    image_id = _stored(site)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", full)
        with pytest.raises(SiteError, match="full"):
            site.hide(image_id)
    assert real_fsync is os.fsync
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        f"{image_id}.img",
        f"{image_id}.json",
    ]


# -- modes (issue 8, item 9) -----------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_store_files_have_explicit_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    site = DirectorySite("s", tmp_path)
    old = os.umask(umask)
    try:
        w = site.create(_new())
        w.write(b"abc")
        partial_mode = stat.S_IMODE(
            (tmp_path / "img" / f".{w.image_id}.img.partial").stat().st_mode
        )
        rec = w.finish()
        site.publish(rec.id, {})
    finally:
        os.umask(old)
    folder = tmp_path / "img"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert partial_mode == 0o640
    for p in folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p.name
