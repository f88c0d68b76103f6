"""One contract suite, run against every kind of Site (rclone's fstests lesson).

The fixtures (``tests/contract/conftest.py``) run it over the memory and directory sites in
the fast unit run and over Glance (the lab) in the integration run. A kind of site that passes
it can be driven by the engine; the memory site behind the engine's unit tests passes every
case, so those tests cannot rely on something a real site does not do.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from imagesync.errors import NotFound, SiteError
from imagesync.model import PROP_ORIGIN, PROP_STATE, ImageRecord, NewImage, parse_time
from imagesync.sites.base import ChangeListing, Hiding, InUseReporting, Site
from tests.contract.conftest import Harness

DATA = os.urandom(300_000)
MISSING = "00000000-0000-0000-0000-000000000000"


def uid() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


def _new(name: str, size: int | None = len(DATA)) -> NewImage:
    return NewImage(
        name=name,
        disk_format="raw",
        container_format="bare",
        min_disk=1,
        min_ram=256,
        properties={"os_distro": "centos", PROP_ORIGIN: "x:1"},
        size=size,
    )


def _upload(site: Site, name: str, data: bytes = DATA) -> str:
    w = site.create(_new(name, len(data)))
    for i in range(0, len(data), 65536):
        w.write(data[i : i + 65536])
    return w.finish().id


def _missing_record(site: Site) -> ImageRecord:
    return ImageRecord(
        site=site.name,
        id=MISSING,
        name="missing",
        status="active",
        created_at=datetime.now(UTC),
        size=10,
    )


def _ids(records: list[ImageRecord]) -> set[str]:
    return {r.id for r in records}


def test_upload_is_invisible_and_marked_until_published(site: Site) -> None:
    name = uid()
    image_id = _upload(site, name)
    (rec,) = site.list_images(name)
    assert rec.id == image_id and rec.in_progress and rec.hidden and not rec.counts
    # what finish() claimed is listed already (the engine's sha512 arrives at publish)
    for algo in site.capabilities.hashes:
        assert rec.hashes.get(algo) == hashlib.new(algo, DATA).hexdigest()
    pub = site.publish(image_id, {"imagesync.sha512": hashlib.sha512(DATA).hexdigest()})
    assert pub.counts and not pub.hidden and PROP_STATE not in pub.properties
    assert pub.hashes.get("sha512") == hashlib.sha512(DATA).hexdigest()
    assert pub.properties["os_distro"] == "centos" and pub.properties[PROP_ORIGIN] == "x:1"
    assert (pub.disk_format, pub.container_format, pub.min_disk, pub.min_ram) == (
        "raw",
        "bare",
        1,
        256,
    )
    assert pub.size == len(DATA)
    site.delete(image_id)


def test_finish_reports_every_hash_the_site_claims_and_they_are_right(site: Site) -> None:
    claimed = site.capabilities.hashes
    assert claimed, "a site that reports no hash cannot have a copy verified"
    w = site.create(_new(uid()))
    for i in range(0, len(DATA), 100_000):
        w.write(DATA[i : i + 100_000])
    finished = w.finish()
    expected = {algo: hashlib.new(algo, DATA).hexdigest() for algo in claimed}
    assert {a: finished.hashes.get(a) for a in claimed} == expected
    published = site.publish(finished.id)
    assert {a: published.hashes.get(a) for a in claimed} == expected
    site.delete(finished.id)


def test_read_back_whole_and_from_an_offset(site: Site) -> None:
    rec = site.publish(_upload(site, uid()))
    assert b"".join(site.open(rec)) == DATA
    assert b"".join(site.open(rec, offset=1000)) == DATA[1000:]
    site.delete(rec.id)


def test_abort_leaves_nothing(site: Site) -> None:
    name = uid()
    w = site.create(_new(name))
    w.write(DATA[:5000])
    w.abort()
    assert site.list_images(name) == []


def test_a_missing_id_is_not_found_on_every_method_and_deleting_it_is_no_error(site: Site) -> None:
    with pytest.raises(NotFound):
        site.get_image(MISSING)
    with pytest.raises(NotFound):
        site.open(_missing_record(site))  # at the call, not at the first chunk
    with pytest.raises(NotFound):
        site.publish(MISSING)
    if (hide := site.capabilities.hide) is not None:
        with pytest.raises(NotFound):
            hide(MISSING)
    site.delete(MISSING)  # not an error


def test_hide_delete_and_name_filter(site: Site) -> None:
    a, b = uid(), uid()
    ra = site.publish(_upload(site, a, b"a" * 10))
    rb = site.publish(_upload(site, b, b"b" * 10))
    assert [r.id for r in site.list_images(a)] == [ra.id]
    if (hide := site.capabilities.hide) is not None:
        hide(ra.id)
        assert site.get_image(ra.id).hidden
        assert [r.id for r in site.list_images(a)] == [ra.id]  # hidden, still listed
    site.delete(ra.id)
    site.delete(rb.id)
    assert site.list_images(a) == [] and site.list_images(b) == []
    with pytest.raises(NotFound):
        site.get_image(ra.id)


def test_capabilities_are_the_optional_protocols_the_site_implements(site: Site) -> None:
    caps = site.capabilities
    assert caps is site.capabilities  # filled once, not per call
    for ability, protocol in (
        ("hide", Hiding),
        ("list_changed", ChangeListing),
        ("images_in_use", InUseReporting),
    ):
        bound = getattr(caps, ability)
        assert (bound is not None) == isinstance(site, protocol), ability
        if bound is not None:
            assert bound == getattr(site, ability), ability  # the site's own method


def test_list_changed_from_a_watermark(harness: Harness) -> None:
    site = harness.site
    list_changed = site.capabilities.list_changed
    if list_changed is None:
        pytest.skip(f"a {site.kind} site cannot list changes (it lacks list_changed)")
    a = site.publish(_upload(site, uid(), b"a" * 10))
    everything, mark = list_changed("")
    assert a.id in _ids(everything)
    first = parse_time(mark)
    assert first is not None and first >= (site.get_image(a.id).updated_at or a.created_at)

    harness.settle()
    b = site.publish(_upload(site, uid(), b"b" * 10))
    changed, mark2 = list_changed(mark)
    assert b.id in _ids(changed)  # a new image after the watermark
    second = parse_time(mark2)
    assert second is not None and second > first

    harness.settle()
    hide = site.capabilities.hide
    assert hide is not None, "the change below is a hide"
    hide(a.id)
    changed, mark3 = list_changed(mark2)
    assert [r.hidden for r in changed if r.id == a.id] == [True]  # an old image, changed
    third = parse_time(mark3)
    assert third is not None and third > second

    idle, mark4 = list_changed(mark3)
    assert b.id not in _ids(idle)  # unchanged since the watermark
    fourth = parse_time(mark4)
    assert fourth is not None and fourth >= third
    site.delete(a.id)
    site.delete(b.id)


def test_an_io_failure_is_a_site_error_never_not_found(harness: Harness) -> None:
    broken = harness.broken()
    try:
        calls: dict[str, Callable[[], object]] = {
            "check_connection": broken.check_connection,
            "list_images": broken.list_images,
            "list_images(name)": lambda: broken.list_images("x"),
            "get_image": lambda: broken.get_image(MISSING),
            "open": lambda: b"".join(broken.open(_missing_record(broken))),
            "upload": lambda: _upload(broken, uid(), b"x" * 10),
            "publish": lambda: broken.publish(MISSING),
            "delete": lambda: broken.delete(MISSING),  # cannot know the image is gone
        }
        if (hide := broken.capabilities.hide) is not None:
            calls["hide"] = lambda: hide(MISSING)
        if (list_changed := broken.capabilities.list_changed) is not None:
            calls["list_changed"] = lambda: list_changed("")
        for what, call in calls.items():
            with pytest.raises(SiteError) as caught:
                call()
            assert not isinstance(caught.value, NotFound), what  # unreachable is not "gone"
    finally:
        broken.close()


def test_check_connection_says_what_answered(site: Site) -> None:
    detail = site.check_connection()
    assert isinstance(detail, str) and detail
