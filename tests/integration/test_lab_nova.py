"""The lab's Nova is real: the OpenStack CLI boots, stops and snapshots servers; a snapshot
holds the fake driver's predictable bytes and goes active; the failure switch makes a snapshot
fail the way a real one does (Nova deletes the image); a restart leaves no process behind."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from imagesync.lab import LabInfo, compute_client, glance_client
from imagesync.lab.nova import FAIL_KEY, snapshot_data
from tests.integration.labcfg import openstack_cli, upload

pytestmark = pytest.mark.integration


def _openstack(lab: LabInfo, *args: str, as_json: bool = True) -> Any:
    return openstack_cli(lab, "--os-cloud", "lab1", *args, as_json=as_json)


def _gone_or_deleted(lab: LabInfo, image_id: str, timeout: float = 30.0) -> bool:
    gc = glance_client(lab, "lab1", admin=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if gc.images.get(image_id)["status"] in ("deleted", "killed"):
                return True
        except Exception as exc:  # glanceclient's HTTPNotFound
            if "404" in str(exc) or type(exc).__name__ == "HTTPNotFound":
                return True
            raise
        time.sleep(0.2)
    return False


def test_the_openstack_cli_boots_stops_and_snapshots(nova_lab: LabInfo, unique_name: str) -> None:
    base = upload(nova_lab, "lab1", f"{unique_name}-base", os.urandom(4096))
    server = _openstack(
        nova_lab,
        "--os-compute-api-version",
        "2.37",
        "server",
        "create",
        "--flavor",
        "lab.tiny",
        "--image",
        base["id"],
        "--nic",
        "none",
        "--wait",
        unique_name,
    )
    assert server["status"] == "ACTIVE"
    _openstack(nova_lab, "server", "stop", server["id"], as_json=False)
    compute_client(nova_lab, "lab1").wait(server["id"], "SHUTOFF")
    listed = {s["ID"]: s["Status"] for s in _openstack(nova_lab, "server", "list")}
    assert listed[server["id"]] == "SHUTOFF"
    snap = _openstack(
        nova_lab,
        "server",
        "image",
        "create",
        "--name",
        f"{unique_name}-snap",
        "--wait",
        server["id"],
    )
    image = dict(glance_client(nova_lab, "lab1").images.get(snap["id"]))
    data = snapshot_data(server["id"])
    assert image["status"] == "active"
    assert image["size"] == len(data)
    assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert image["image_type"] == "snapshot" and image["instance_uuid"] == server["id"]
    compute_client(nova_lab, "lab1").delete(server["id"])


@pytest.mark.parametrize("switch", ["metadata", "file"])
def test_a_failing_snapshot_leaves_no_image(
    nova_lab: LabInfo, unique_name: str, switch: str
) -> None:
    nova = compute_client(nova_lab, "lab1")
    base = upload(nova_lab, "lab1", f"{unique_name}-base", os.urandom(4096))
    server = nova.boot(unique_name, base["id"])
    fail_file = nova_lab.directory / "lab1" / "nova" / "lab-fail"
    try:
        if switch == "metadata":
            nova.set_metadata(server["id"], {FAIL_KEY: "snapshot"})
        else:
            fail_file.write_text("snapshot\n")
        resp = nova.session.post(
            f"{nova.url}/servers/{server['id']}/action",
            json={"createImage": {"name": f"{unique_name}-snap"}},
            headers={"X-OpenStack-Nova-API-Version": "2.45"},
        )
        image_id = resp.json()["image_id"]
        assert _gone_or_deleted(nova_lab, image_id)
        after = nova.wait(server["id"], "ACTIVE")  # the server is as it was
        assert after["OS-EXT-STS:task_state"] is None
    finally:
        fail_file.unlink(missing_ok=True)
        nova.delete(server["id"])


def test_a_boot_can_be_made_to_fail(nova_lab: LabInfo, unique_name: str) -> None:
    nova = compute_client(nova_lab, "lab1")
    base = upload(nova_lab, "lab1", f"{unique_name}-base", os.urandom(4096))
    server = nova.boot(unique_name, base["id"], metadata={FAIL_KEY: "boot"}, wait=False)
    try:
        assert nova.wait(server["id"], "ERROR")["status"] == "ERROR"
    finally:
        nova.delete(server["id"])


def test_up_down_up_with_nova_leaves_nothing_behind(tmp_path: Path) -> None:
    """A lab of its own: cold with Nova, down (no process left), warm (Nova works again on
    fresh databases), down. Prints the start times (the numbers in the README)."""
    from imagesync import lab as lab_mod
    from tests.integration.test_lab import _processes_mentioning

    directory = tmp_path / "lab"
    try:
        cold = lab_mod.up(clouds=1, directory=directory, nova_clouds=1)
        assert cold.start_kind == "cold" and cold.cloud("lab1").compute_url
        lab_mod.down(directory)
        assert _processes_mentioning(directory) == []
        warm = lab_mod.up(clouds=1, directory=directory)  # compute stays once asked for
        assert warm.start_kind == "warm" and warm.cloud("lab1").compute_url
        base = upload(warm, "lab1", "base", os.urandom(4096))
        nova = compute_client(warm, "lab1")
        server = nova.boot("again", base["id"])
        assert nova.stop(server["id"])["status"] == "SHUTOFF"
        print(f"lab with nova: cold {cold.start_seconds:.1f} s, warm {warm.start_seconds:.1f} s")
    finally:
        lab_mod.down(directory)
    assert _processes_mentioning(directory) == []
