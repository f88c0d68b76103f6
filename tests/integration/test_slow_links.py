"""The data path on uneven, breaking links, against the lab's real Glance: a cloud behind a
throttled link holds no fast target back, and a source download cut part-way resumes with
Range instead of re-sending every target.

The links are ``tests/faultproxy.py`` proxies in front of a cloud's Glance (a cap on uploads
in bytes/s; downloads cut at image offsets). Assertions are about order (who published
first: the upload watcher hears it), counts (reads, resumes, bytes the proxy passed) and
the copies' bytes, never about wall-clock thresholds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagesync.convert_scratch import Scratch
from imagesync.lab import LabInfo
from imagesync.model import ImageRecord
from imagesync.sites import open_site
from imagesync.sites.base import Site
from imagesync.transfer import CopyResult, Tuning, copy_image, new_image_for
from tests.integration.labcfg import (
    MB,
    images_named,
    make_config,
    proxied,
    random_image,
    sha512,
    stored_bytes,
)

pytestmark = pytest.mark.integration


class _Published:
    """An UploadWatcher keeping the order in which uploads ended (published)."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def started(self, site: str, image_id: str) -> None:
        pass

    def ended(self, site: str, image_id: str) -> None:
        self.order.append(site)


def _copy(
    sites: dict[str, Site],
    name: str,
    targets: list[str],
    watcher: _Published | None = None,
    spool: Scratch | None = None,
) -> tuple[ImageRecord, CopyResult]:
    (rec,) = sites["lab1"].list_images(name)
    new = new_image_for(rec, rec.version, "private")
    result = copy_image(
        sites["lab1"],
        rec,
        [(sites[t], new) for t in targets],
        watcher=watcher,
        tuning=Tuning(detach_after=0.3, spool_room=spool.spool if spool else None),
    )
    return rec, result


def test_a_throttled_cloud_holds_no_fast_target_back(lab: LabInfo, tmp_path: Path) -> None:
    name, data, _ = random_image(lab, "slow", 64 * MB)
    with proxied(lab, "lab2") as (proxy, lab2):
        proxy.plan.upload_rate = 2.5 * MB  # ~25 s for lab2, a few for the others
        config = make_config(lab, tmp_path, name, overrides={"lab2": lab2})
        sites = {n: open_site(config, n) for n in ("lab1", "lab2", "lab3", "archive")}
        watcher = _Published()
        try:
            _, result = _copy(sites, name, ["lab2", "archive", "lab3"], watcher)
        finally:
            for s in sites.values():
                s.close()
    assert result.ok, [t.error for t in result.targets]
    # listed first, the slow cloud published last: it was detached onto a second read
    assert watcher.order[-1] == "lab2" and set(watcher.order) == {"lab2", "archive", "lab3"}
    assert result.detached == ["lab2"] and result.reads == 2
    assert proxy.plan.slowed >= 1
    for cloud in ("lab2", "lab3"):
        (copy,) = images_named(lab, cloud, name)
        assert copy["os_hash_value"] == sha512(data) and not copy["os_hidden"]
    assert sha512(stored_bytes(tmp_path / "store", name)) == sha512(data)


def test_with_a_spool_two_throttled_clouds_keep_their_own_paces_from_one_download(
    lab: LabInfo, tmp_path: Path
) -> None:
    """Two clouds behind links of different speeds: each is served from the copy's spool at
    its own pace (the faster publishes first though listed last), and lab1 is read once."""
    name, data, _ = random_image(lab, "spooled", 16 * MB)
    scratch = Scratch(tmp_path / "scratch", max_size=64 * MB)
    with proxied(lab, "lab2") as (slow, lab2), proxied(lab, "lab3") as (mid, lab3):
        slow.plan.upload_rate = 2 * MB  # ~8 s
        mid.plan.upload_rate = 5 * MB  # ~3 s
        config = make_config(lab, tmp_path, name, overrides={"lab2": lab2, "lab3": lab3})
        sites = {n: open_site(config, n) for n in ("lab1", "lab2", "lab3", "archive")}
        watcher = _Published()
        try:
            _, result = _copy(sites, name, ["lab2", "lab3", "archive"], watcher, scratch)
        finally:
            for s in sites.values():
                s.close()
    assert result.ok, [t.error for t in result.targets]
    assert watcher.order == ["archive", "lab3", "lab2"]
    assert sorted(result.detached) == ["lab2", "lab3"]
    assert result.reads == 1 and result.resumes == 0  # one download for three paces
    for cloud in ("lab2", "lab3"):
        (copy,) = images_named(lab, cloud, name)
        assert copy["os_hash_value"] == sha512(data) and not copy["os_hidden"]
    assert sha512(stored_bytes(tmp_path / "store", name)) == sha512(data)
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == [".budget.lock"]


@pytest.mark.parametrize("cuts", [(0.5,), (0.5, 0.9)], ids=["cut-50", "cut-50-90"])
def test_a_cut_source_read_resumes_with_range(
    lab: LabInfo, tmp_path: Path, cuts: tuple[float, ...]
) -> None:
    size = 12 * MB + 7
    name, data, _ = random_image(lab, "cut", size)
    with proxied(lab, "lab1") as (proxy, lab1):
        proxy.plan.cut_download_at = [int(size * c) for c in cuts]
        config = make_config(lab, tmp_path, name, overrides={"lab1": lab1})
        sites = {n: open_site(config, n) for n in ("lab1", "lab2", "archive")}
        try:
            _, result = _copy(sites, name, ["lab2", "archive"])
        finally:
            for s in sites.values():
                s.close()
    assert result.ok, [t.error for t in result.targets]
    assert proxy.plan.cuts == len(cuts) and result.resumes == len(cuts)
    assert all(t.attempts == 1 for t in result.targets)  # no target was re-sent
    # the source was read once over, not 2-3x: what a cut loses is at most the chunk the
    # client was gathering (1 MiB), read again after it
    assert size <= proxy.plan.downloaded <= size + len(cuts) * MB
    (copy,) = images_named(lab, "lab2", name)
    assert copy["os_hash_value"] == sha512(data)
    assert sha512(stored_bytes(tmp_path / "store", name)) == sha512(data)
