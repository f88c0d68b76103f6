"""``imagesync snapshot`` against the lab's real Nova: a SHUTOFF and an ACTIVE server, a
failing snapshot (nothing left, a clear error, exit 1), and ``--push`` reaching lab2 with the
snapshot as the newest version (not as the copy it was booted from)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from imagesync import cli
from imagesync.check import check
from imagesync.commands import push
from imagesync.lab import LabInfo, glance_client
from imagesync.lab.nova import FAIL_KEY, snapshot_data
from imagesync.state import State
from tests.integration.labcfg import fresh_image, images_named, make_config, nova_server, write_yaml

pytestmark = pytest.mark.integration


def _snapshot(
    capsys: pytest.CaptureFixture[str], config: Path, *args: str
) -> tuple[int, dict[str, object], str]:
    capsys.readouterr()
    code = cli.main(["-c", str(config), "snapshot", *args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_a_shutoff_server_becomes_the_newest_version_of_its_image(
    nova_lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, base = fresh_image(nova_lab, "snap")
    config = write_yaml(nova_lab, tmp_path, name, ["lab1", "lab2"])
    with nova_server(nova_lab, name, base["id"], stop=True) as (_, server):
        code, out, err = _snapshot(capsys, config, server, "--cloud", "lab1", "--wait")
        assert code == 0, err
        assert out["name"] == name and out["status"] == "active"  # its base image's name
        assert out["sha512"] == hashlib.sha512(snapshot_data(server)).hexdigest()
        assert "warning" not in err
        image = glance_client(nova_lab, "lab1").images.get(out["image_id"])
        assert image["status"] == "active" and image["name"] == name
        # recorded as a version imagesync made
        state = State(tmp_path / "state")
        try:
            assert str(out["image_id"]) in state.made().get("lab1", frozenset())
        finally:
            state.close()


def test_an_active_server_gets_a_warning_or_is_stopped_with_stop(
    nova_lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, base = fresh_image(nova_lab, "snap")
    config = write_yaml(nova_lab, tmp_path, name, ["lab1"])
    with nova_server(nova_lab, name, base["id"]) as (nova, server):
        code, out, err = _snapshot(
            capsys, config, name, "--cloud", "lab1", "--as", f"{name}-x", "--wait"
        )  # by name
        assert code == 0 and out["status"] == "active" and out["name"] == f"{name}-x"
        assert "ACTIVE, not SHUTOFF" in err and "--stop" in err
        assert nova.get(server)["status"] == "ACTIVE"

        code, out, err = _snapshot(capsys, config, server, "--cloud", "lab1", "--stop")
        assert code == 0 and out["stopped"] is True and "warning" not in err
        assert nova.get(server)["status"] == "SHUTOFF"  # left stopped


def test_a_failing_snapshot_leaves_nothing_and_says_so(
    nova_lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, base = fresh_image(nova_lab, "snap")
    config = write_yaml(nova_lab, tmp_path, name, ["lab1", "lab2"])
    failing = {FAIL_KEY: "snapshot"}
    with nova_server(nova_lab, name, base["id"], stop=True, metadata=failing) as (nova, server):
        code, out, _ = _snapshot(capsys, config, server, "--cloud", "lab1", "--wait", "--push")
        assert code == 1 and out["ok"] is False
        assert "snapshot of server" in str(out["error"]) and "failed" in str(out["error"])
        assert [i["id"] for i in images_named(nova_lab, "lab1", name)] == [base["id"]]
        assert images_named(nova_lab, "lab2", name) == []  # nothing pushed
        assert nova.get(server)["OS-EXT-STS:task_state"] is None


def test_push_spreads_a_snapshot_of_a_copy_as_a_new_version(
    nova_lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Booted from imagesync's copy on lab1 (which carries imagesync.origin=lab2:…), the
    snapshot inherits those marks but is a version of its own: --push takes it to lab2, and
    lab2's check answers with it, not with the original it was booted from."""
    name, original = fresh_image(nova_lab, "snap", cloud="lab2")
    cfg = make_config(nova_lab, tmp_path, name, clouds=["lab1", "lab2"], store=False)
    assert push(cfg, name) == 0
    (copy,) = images_named(nova_lab, "lab1", name)
    assert copy["imagesync.origin"] == f"lab2:{original['id']}"
    config = write_yaml(nova_lab, tmp_path, name, ["lab1", "lab2"])
    with nova_server(nova_lab, name, copy["id"], stop=True) as (_, server):
        code, out, err = _snapshot(capsys, config, server, "--cloud", "lab1", "--push")
        assert code == 0, err
        snap_id = str(out["image_id"])
        expected = hashlib.sha512(snapshot_data(server)).hexdigest()
        assert out["push"]["exit"] == 0  # type: ignore[index]
        on_lab2 = [i for i in images_named(nova_lab, "lab2", name) if i["id"] != original["id"]]
        assert len(on_lab2) == 1
        assert on_lab2[0]["os_hash_value"] == expected
        assert on_lab2[0]["imagesync.origin"] == f"lab1:{snap_id}"  # not the old origin
        assert "image_type" not in on_lab2[0]  # Nova's server marks stay on lab1
        capsys.readouterr()
        assert check(cfg, name, "lab2", fresh=True) == 0
        assert capsys.readouterr().out.strip() == on_lab2[0]["id"]
