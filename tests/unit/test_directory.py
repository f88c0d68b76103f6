"""The directory store: safe names, atomic publish, nothing half-made after abort."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagesync.errors import NotFound, SiteError
from imagesync.model import NewImage
from imagesync.sites.directory import DirectorySite, check_name


@pytest.mark.parametrize("name", ["", ".", "..", "../etc", "a/b", "a\\b", "x\0y", ".hidden",
                                  "tab\tname", "x" * 256])
def test_unsafe_names_are_rejected(name: str) -> None:
    with pytest.raises(SiteError):
        check_name(name)


def test_unsafe_name_cannot_create(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    with pytest.raises(SiteError):
        site.create(NewImage("../escape", "raw", "bare", 0, 0, {}, 3))
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "escape").exists()


def test_upload_is_invisible_until_published(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    w = site.create(NewImage("img", "raw", "bare", 0, 0, {"k": "v"}, 3))
    w.write(b"abc")
    rec = w.finish()
    listed = site.list_images("img")
    assert [r.id for r in listed] == [rec.id] and listed[0].in_progress and listed[0].hidden
    assert not listed[0].counts
    pub = site.publish(rec.id, {"imagesync.sha512": "f" * 128})
    assert pub.counts and not pub.hidden and pub.properties["k"] == "v"
    assert b"".join(site.open(pub)) == b"abc"
    assert (tmp_path / "img" / f"{rec.id}.img").read_bytes() == b"abc"


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    w = site.create(NewImage("img", "raw", "bare", 0, 0, {}, 3))
    w.write(b"ab")
    w.abort()
    assert list(tmp_path.rglob("*")) == []


def test_delete_and_missing_ids(tmp_path: Path) -> None:
    site = DirectorySite("s", tmp_path)
    w = site.create(NewImage("img", "raw", "bare", 0, 0, {}, 1))
    w.write(b"x")
    rec = site.publish(w.finish().id)
    site.delete(rec.id)
    assert site.list_images() == []
    site.delete(rec.id)  # missing is not an error
    with pytest.raises(NotFound):
        site.get_image(rec.id)
    with pytest.raises(NotFound):
        site.get_image("../../etc/passwd")
