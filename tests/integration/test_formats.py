"""Each cloud gets the disk format it wants, against the lab's real Keystone and Glance:
qcow2 → raw and raw → qcow2 across two clouds (checked with ``qemu-img compare``), status shows
the converted copy as current, and a scratch space too small says so and leaves nothing."""

from __future__ import annotations

import dataclasses
import io
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagesync.commands import push, status, sync
from imagesync.config.types import Config, ConversionConfig
from imagesync.lab import LabInfo, glance_client
from imagesync.model import PROP_CONVERTED_FROM, PROP_CONVERTED_SHA512, PROP_ORIGIN, PROP_SHA512
from imagesync.state import State
from tests.debpkg import ensure_tool
from tests.integration.labcfg import cloud_config, images_named, make_config, sha512, uid
from tests.unit.test_convert import make_image

pytestmark = pytest.mark.integration
MB = 1 << 20


@pytest.fixture(scope="module")
def qemu_img() -> Path:
    return ensure_tool("/usr/bin/qemu-img", "qemu-utils")


def _upload(lab: LabInfo, cloud: str, name: str, data: bytes, fmt: str) -> dict[str, Any]:
    gc = glance_client(lab, cloud)
    img = gc.images.create(name=name, disk_format=fmt, container_format="bare")
    gc.images.upload(img["id"], io.BytesIO(data), image_size=len(data))
    return dict(gc.images.get(img["id"]))


def _config(
    lab: LabInfo, tmp_path: Path, name: str, wants: str, scratch_max: int = 64 * MB
) -> Config:
    ceph = dataclasses.replace(cloud_config(lab, "lab2"), disk_formats=(wants,))
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"], store=False)
    return dataclasses.replace(
        config,
        clouds={**config.clouds, "lab2": ceph},
        conversion=ConversionConfig(tmp_path / "scratch", scratch_max),
    )


@pytest.mark.parametrize(("have", "wants"), [("qcow2", "raw"), ("raw", "qcow2")])
def test_a_version_reaches_a_cloud_in_the_format_it_wants(
    lab: LabInfo,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    qemu_img: Path,
    have: str,
    wants: str,
) -> None:
    name = uid(f"fmt-{have}")
    (tmp_path / "disk").mkdir()
    data = make_image(qemu_img, tmp_path / "disk", have, virtual=8 * MB)
    orig = _upload(lab, "lab1", name, data, have)
    config = _config(lab, tmp_path, name, wants)
    capsys.readouterr()
    assert sync(config, dry_run=True) == 0  # says what will happen, does nothing
    assert f"; lab2: converted from {have} to {wants}" in capsys.readouterr().out
    assert images_named(lab, "lab2", name) == []
    assert push(config, name) == 0

    (copy,) = images_named(lab, "lab2", name)
    assert copy["status"] == "active" and not copy.get("os_hidden")
    assert copy["disk_format"] == wants
    assert copy[PROP_ORIGIN] == f"lab1:{orig['id']}"
    assert copy[PROP_SHA512] == sha512(data)  # identity: the original's bytes
    assert copy[PROP_CONVERTED_FROM] == f"{have}:{sha512(data)}"
    got = b"".join(glance_client(lab, "lab2").images.data(copy["id"]))
    # Glance's own hash of what it stores is the copy's recorded sha512
    assert copy["os_hash_value"] == copy[PROP_CONVERTED_SHA512] == sha512(got)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(got)
    compare: list[str | Path] = [
        qemu_img,
        "compare",
        "-f",
        have,
        "-F",
        wants,
        tmp_path / "a",
        tmp_path / "b",
    ]
    assert subprocess.run(compare, capture_output=True, check=False).returncode == 0

    capsys.readouterr()
    assert status(config, name) == 0
    out = capsys.readouterr().out
    assert f"current {copy['id'][:8]} ({wants}, converted)" in out, out
    assert "stale" not in out and "mismatch" not in out
    # a second push finds it current: nothing transferred again
    history = len(State(config.state_dir).history(name))
    assert push(config, name) == 0
    assert len(State(config.state_dir).history(name)) == history
    assert list((tmp_path / "scratch").glob("convert-*")) == []


def test_a_scratch_space_too_small_says_so_and_leaves_nothing(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str], qemu_img: Path
) -> None:
    name = uid("fmt-small")
    data = make_image(qemu_img, tmp_path, "qcow2", virtual=32 * MB)
    assert len(data) < 2 * MB
    _upload(lab, "lab1", name, data, "qcow2")
    config = _config(lab, tmp_path, name, "raw", scratch_max=8 * MB)
    capsys.readouterr()
    assert push(config, name) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "scratch space too small" in text and "32.0 MiB (its virtual size)" in text, text
    assert "Traceback" not in text
    assert images_named(lab, "lab2", name) == []  # not even a hidden upload
    assert list((tmp_path / "scratch").glob("convert-*")) == []
    (row,) = State(config.state_dir).history(name)
    assert row["result"] == "conversion" and "scratch_max_size is 8.0 MiB" in row["error"]
