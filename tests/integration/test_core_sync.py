"""Core sync against the lab's real Keystone and Glance: push, provenance, faults, check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from imagesync.commands import push
from imagesync.lab import LabInfo, glance_client
from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_STATE, PROP_VERSION
from imagesync.state import State
from tests.integration.labcfg import (
    MB,
    cloud_config,
    fresh_image,
    images_named,
    make_config,
    proxied,
    random_bytes,
    random_image,
    sha512,
    stored_bytes,
    uid,
    upload,
)

pytestmark = pytest.mark.integration


def test_push_across_two_clouds_with_provenance_and_idempotence(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, data, orig = random_image(
        lab, "push", 3 * MB + 123, os_distro="ubuntu", hw_disk_bus="virtio"
    )
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"])
    assert push(config, name) == 0
    copies = images_named(lab, "lab2", name)
    assert len(copies) == 1
    copy = copies[0]
    assert copy["status"] == "active" and not copy.get("os_hidden")
    assert copy["os_hash_algo"] == "sha512" and copy["os_hash_value"] == sha512(data)
    assert copy[PROP_ORIGIN] == f"lab1:{orig['id']}"
    assert copy[PROP_SHA512] == sha512(data)
    assert copy[PROP_VERSION].startswith(orig["created_at"].rstrip("Z"))
    assert PROP_STATE not in copy
    assert copy["os_distro"] == "ubuntu" and copy["hw_disk_bus"] == "virtio"
    assert copy["visibility"] == "private"
    assert copy["disk_format"] == "raw" and copy["container_format"] == "bare"
    # the directory store has it too, byte for byte
    assert sha512(stored_bytes(tmp_path / "store", name)) == sha512(data)

    history = len(State(config.state_dir).history(name))
    capsys.readouterr()
    assert push(config, name) == 0  # idempotent: a second run transfers nothing
    assert len(State(config.state_dir).history(name)) == history
    assert len(images_named(lab, "lab2", name)) == 1
    assert "already current" in capsys.readouterr().out


def test_newer_version_on_b_reaches_a(lab: LabInfo, tmp_path: Path) -> None:
    name = uid("newer")
    v1, v2 = random_bytes(MB), random_bytes(MB + 7)
    upload(lab, "lab1", name, v1)
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"], store=False)
    assert push(config, name) == 0
    time.sleep(1.1)  # Glance's created_at has one-second resolution
    new = upload(lab, "lab2", name, v2)
    assert push(config, name) == 0
    on_a = [i for i in images_named(lab, "lab1", name) if i.get(PROP_ORIGIN)]
    assert [i["os_hash_value"] for i in on_a] == [sha512(v2)]
    assert on_a[0][PROP_ORIGIN] == f"lab2:{new['id']}"


def test_byte_flipped_on_upload_is_caught_and_removed(lab: LabInfo, tmp_path: Path) -> None:
    name, _ = fresh_image(lab, "flipup", 2 * MB)
    with proxied(lab, "lab2") as (proxy, lab2):
        proxy.plan.flip_upload_at = 1_234_567
        config = make_config(
            lab, tmp_path, name, clouds=["lab1", "lab2"], store=False, overrides={"lab2": lab2}
        )
        assert push(config, name, as_json=True) == 1
    assert proxy.plan.flips >= 1
    assert images_named(lab, "lab2", name) == []  # nothing left, not even queued/hidden
    hist = State(config.state_dir).history(name)
    assert hist and hist[0]["result"] == "integrity"


def test_byte_flipped_on_download_is_caught_and_nothing_is_left(
    lab: LabInfo, tmp_path: Path
) -> None:
    name, _ = fresh_image(lab, "flipdown", 2 * MB)
    with proxied(lab, "lab1") as (proxy, lab1):
        proxy.plan.flip_download_at = 777_777
        config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"], overrides={"lab1": lab1})
        assert push(config, name) == 1
    assert proxy.plan.flips >= 1
    assert images_named(lab, "lab2", name) == []
    assert not list((tmp_path / "store").rglob("*.img")) and not list(
        (tmp_path / "store").rglob(".*")
    )


def test_connection_cut_mid_upload_is_retried(lab: LabInfo, tmp_path: Path) -> None:
    name, data, _ = random_image(lab, "cut", 3 * MB)
    with proxied(lab, "lab2") as (proxy, lab2):
        proxy.plan.cut_upload_after = MB
        proxy.plan.cut_times = 1
        config = make_config(
            lab, tmp_path, name, clouds=["lab1", "lab2"], store=False, overrides={"lab2": lab2}
        )
        assert push(config, name) == 0
    assert proxy.plan.cuts == 1
    images = images_named(lab, "lab2", name)
    assert [i["status"] for i in images] == ["active"]
    assert images[0]["os_hash_value"] == sha512(data)


def test_connection_cut_every_time_fails_cleanly(lab: LabInfo, tmp_path: Path) -> None:
    name, _ = fresh_image(lab, "cutall", 2 * MB)
    with proxied(lab, "lab2") as (proxy, lab2):
        proxy.plan.cut_upload_after = 100_000
        proxy.plan.cut_times = 99
        config = make_config(
            lab, tmp_path, name, clouds=["lab1", "lab2"], store=False, overrides={"lab2": lab2}
        )
        assert push(config, name) == 1
    assert proxy.plan.cuts >= 2
    assert images_named(lab, "lab2", name) == []


def test_dry_run_changes_nothing(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, _ = fresh_image(lab, "dry", 1000)
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"])
    assert push(config, name, dry_run=True, as_json=True) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [a["kind"] for a in plan["actions"]] == ["copy"]
    assert plan["actions"][0]["targets"] == ["lab2", "archive"]
    assert images_named(lab, "lab2", name) == []


def test_glance_lists_hidden_images_and_all_pages(lab: LabInfo, tmp_path: Path) -> None:
    from imagesync.sites.glance import GlanceSite

    name = uid("page")
    gc = glance_client(lab, "lab3")
    ids = set()
    for i in range(7):
        img = gc.images.create(
            name=name, disk_format="raw", container_format="bare", os_hidden=(i % 3 == 0)
        )
        ids.add(img["id"])
    site = GlanceSite(cloud_config(lab, "lab3"))
    found = {r.id for r in site.list_images(name)}
    assert found == ids
    # force tiny pages to prove `next` links are followed
    pages = site._list({"name": name, "limit": "2", "visibility": "all"})
    assert len({r.id for r in pages}) == len([i for i in range(7) if i % 3 != 0])


def test_glance_lists_only_what_changed_since_a_watermark(lab: LabInfo) -> None:
    from imagesync.sites.glance import GlanceSite

    site = GlanceSite(cloud_config(lab, "lab3"))
    gc = glance_client(lab, "lab3")
    old = gc.images.create(name=uid("old"), disk_format="raw", container_format="bare")
    everything, watermark = site.list_changed("")
    assert old["id"] in {r.id for r in everything}
    time.sleep(1.1)  # Glance's timestamps have one-second resolution
    new = gc.images.create(
        name=uid("new"), disk_format="raw", container_format="bare", os_hidden=True
    )
    gc.images.update(old["id"], os_distro="changed")  # an update counts as a change too
    changed, next_mark = site.list_changed(watermark)
    ids = {r.id for r in changed}
    assert new["id"] in ids and old["id"] in ids
    assert len(ids) < len(everything) + 1  # not a full listing
    time.sleep(1.1)
    idle, _ = site.list_changed(next_mark)
    assert {r.id for r in idle} <= ids  # nothing new: at most the boundary records again
