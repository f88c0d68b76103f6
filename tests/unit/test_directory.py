"""The directory store's own rules: safe names, the layout on disk, nothing half-made after
abort, and the sentences its connection check gives. (What every site does is in
tests/contract.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagesync.errors import NotFound, SiteError
from imagesync.model import NewImage
from imagesync.sites.directory import DirectorySite, check_name


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
