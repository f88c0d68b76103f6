"""The scheduler's pre-flight `check`: every exit code, recorded answers, --ensure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagesync.check import check
from imagesync.commands import push
from imagesync.config.types import Config
from imagesync.lab import LabInfo
from tests.integration.labcfg import (
    cloud_config,
    fresh_image,
    make_config,
    random_bytes,
    uid,
    upload,
    write_yaml,
)

pytestmark = pytest.mark.integration


def _pushed(lab: LabInfo, tmp_path: Path, prefix: str, size: int) -> tuple[str, Config]:
    """A new image of ``size`` bytes uploaded to lab1 and pushed to lab2 (the sites of the
    returned config)."""
    name, _ = fresh_image(lab, prefix, size)
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"], store=False)
    assert push(config, name) == 0
    return name, config


def test_exit_0_prints_the_image_id_to_boot(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, config = _pushed(lab, tmp_path, "chk", 5000)
    capsys.readouterr()
    assert check(config, name, "lab2", fresh=True) == 0
    image_id = capsys.readouterr().out.strip()
    from imagesync.lab import glance_client

    assert glance_client(lab, "lab2").images.get(image_id)["name"] == name
    # answered from what push recorded, without asking any site
    assert check(config, name, "lab2", as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_id"] == image_id and out["answered_from"] == "confirmed"


def test_exit_1_when_missing_or_stale(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, _ = fresh_image(lab, "chk1", 3000)
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"], store=False)
    assert check(config, name, "lab2") == 1
    assert "missing" in capsys.readouterr().err
    assert push(config, name) == 0
    import time

    time.sleep(1.1)
    upload(lab, "lab1", name, random_bytes(3001))
    capsys.readouterr()
    assert check(config, name, "lab2", fresh=True) == 1
    assert "stale" in capsys.readouterr().err


def test_exit_1_when_no_such_image_anywhere(lab: LabInfo, tmp_path: Path) -> None:
    config = make_config(lab, tmp_path, "nothing-*", clouds=["lab1"], store=False)
    assert check(config, uid("nothing"), "lab1") == 1


def test_exit_3_when_the_cloud_is_unreachable(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = uid("chk3")
    dead = cloud_config(lab, "lab2", auth_url="http://127.0.0.1:9/v3")
    config = make_config(
        lab, tmp_path, name, clouds=["lab1", "lab2"], store=False, overrides={"lab2": dead}
    )
    assert check(config, name, "lab2") == 3
    err = capsys.readouterr().err
    assert "cannot tell" in err
    assert lab.cloud("lab2").password not in err


def test_ensure_pushes_then_answers(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, _ = fresh_image(lab, "ens", 20000)
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2", "lab3"], store=False)
    assert check(config, name, "lab3", ensure=True, timeout=120) == 0
    image_id = capsys.readouterr().out.strip()
    from tests.integration.labcfg import images_named

    assert [i["id"] for i in images_named(lab, "lab3", name)] == [image_id]
    assert images_named(lab, "lab2", name) == []  # only the cloud asked for


def test_exit_2_for_usage_and_config_errors_through_the_cli(lab: LabInfo, tmp_path: Path) -> None:
    path = write_yaml(lab, tmp_path, "*", ["lab1"])
    cmd = [sys.executable, "-m", "imagesync.cli", "-c", str(path), "check", "x", "--cloud", "nope"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "nope" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "imagesync.cli", "-c", str(path), "check", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--cloud" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("clouds: [oops\n")
    r = subprocess.run(
        [sys.executable, "-m", "imagesync.cli", "-c", str(bad), "check", "x", "--cloud", "lab1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(bad) in r.stderr
    # and through the CLI, a real answer: missing → 1
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagesync.cli",
            "-c",
            str(path),
            "check",
            uid("none"),
            "--cloud",
            "lab1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr


def test_a_recorded_id_deleted_by_someone_else_is_never_handed_out(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imagesync.lab import glance_client

    name, config = _pushed(lab, tmp_path, "chkdel", 4000)
    capsys.readouterr()
    assert check(config, name, "lab2") == 0  # recorded, confirmed by one GET
    image_id = capsys.readouterr().out.strip()
    glance_client(lab, "lab2").images.delete(image_id)  # an operator cleans up by hand
    assert check(config, name, "lab2") == 1  # asked the sites: missing there now
    captured = capsys.readouterr()
    assert image_id not in captured.out and "missing" in captured.err
