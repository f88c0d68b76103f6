"""One contract suite, run against every kind of Site (rclone's fstests lesson)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagesync.errors import NotFound
from imagesync.lab import LabInfo
from imagesync.model import PROP_ORIGIN, PROP_STATE, NewImage
from imagesync.sites.base import Site
from imagesync.sites.directory import DirectorySite
from imagesync.sites.glance import GlanceSite
from tests.integration.labcfg import cloud_config, uid

pytestmark = pytest.mark.integration
DATA = os.urandom(300_000)


@pytest.fixture(params=["directory", "glance"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    if request.param == "directory":
        yield DirectorySite("store", tmp_path)
    else:
        lab: LabInfo = request.getfixturevalue("lab")
        yield GlanceSite(cloud_config(lab, "lab3"))


def _new(name: str, size: int | None = len(DATA)) -> NewImage:
    return NewImage(name=name, disk_format="raw", container_format="bare", min_disk=1,
                    min_ram=256, properties={"os_distro": "centos", PROP_ORIGIN: "x:1"},
                    size=size)


def _upload(site: Site, name: str, data: bytes = DATA) -> str:
    w = site.create(_new(name, len(data)))
    for i in range(0, len(data), 65536):
        w.write(data[i:i + 65536])
    return w.finish().id


def test_upload_is_invisible_and_marked_until_published(site: Site) -> None:
    name = uid("c")
    image_id = _upload(site, name)
    (rec,) = site.list_images(name)
    assert rec.id == image_id and rec.in_progress and rec.hidden and not rec.counts
    assert rec.hashes.get("sha512") == hashlib.sha512(DATA).hexdigest()
    pub = site.publish(image_id, {"imagesync.sha512": hashlib.sha512(DATA).hexdigest()})
    assert pub.counts and not pub.hidden and PROP_STATE not in pub.properties
    assert pub.properties["os_distro"] == "centos" and pub.properties[PROP_ORIGIN] == "x:1"
    assert (pub.disk_format, pub.container_format, pub.min_disk, pub.min_ram) == (
        "raw", "bare", 1, 256)
    assert pub.size == len(DATA)
    site.delete(image_id)


def test_read_back_whole_and_from_an_offset(site: Site) -> None:
    name = uid("c")
    rec = site.publish(_upload(site, name))
    assert b"".join(site.open(rec)) == DATA
    assert b"".join(site.open(rec, offset=1000)) == DATA[1000:]
    site.delete(rec.id)


def test_abort_leaves_nothing(site: Site) -> None:
    name = uid("c")
    w = site.create(_new(name))
    w.write(DATA[:5000])
    w.abort()
    assert site.list_images(name) == []


def test_missing_ids(site: Site) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(NotFound):
        site.get_image(missing)
    site.delete(missing)  # not an error


def test_hide_delete_and_name_filter(site: Site) -> None:
    a, b = uid("c"), uid("c")
    ra = site.publish(_upload(site, a, b"a" * 10))
    rb = site.publish(_upload(site, b, b"b" * 10))
    assert [r.id for r in site.list_images(a)] == [ra.id]
    if site.capabilities.hide:
        site.hide(ra.id)
        assert site.get_image(ra.id).hidden
    site.delete(ra.id)
    site.delete(rb.id)
    assert site.list_images(a) == [] and site.list_images(b) == []


def test_check_connection(site: Site) -> None:
    site.check_connection()
