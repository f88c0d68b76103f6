"""Whose images count, on real Glance: another project's image with a managed name is ignored
(never copied, never retired, never what ``check`` answers) and ``status`` says so."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from imagesync.check import check
from imagesync.commands import push, status, sync
from imagesync.lab import LabInfo, glance_client
from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_VERSION
from tests.integration.labcfg import (
    fresh_image,
    images_named,
    make_config,
    random_bytes,
    sha512,
    uid,
)

pytestmark = pytest.mark.integration


def foreign_upload(lab: LabInfo, cloud: str, name: str, data: bytes, **props: str) -> Any:
    """An image uploaded by another project (the lab's admin project) for everyone to see."""
    gc = glance_client(lab, cloud, admin=True)
    img = gc.images.create(
        name=name, disk_format="raw", container_format="bare", visibility="community", **props
    )
    gc.images.upload(img["id"], io.BytesIO(data), image_size=len(data))
    return gc.images.get(img["id"])


def test_another_projects_image_is_never_copied_retired_or_answered(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, ours = fresh_image(lab, "trust", 3000)
    config = make_config(
        lab, tmp_path, name, clouds=["lab1", "lab2"], store=False, keep=1, retire="delete"
    )
    assert push(config, name) == 0
    (copy,) = images_named(lab, "lab2", name)
    # Another project publishes a newer image with the name, claiming to be an old copy
    # imagesync made (so that retention would take it for one of its own).
    evil_bytes = random_bytes(4000)
    theirs = foreign_upload(
        lab,
        "lab1",
        name,
        evil_bytes,
        **{
            PROP_ORIGIN: "lab9:old",
            PROP_VERSION: "2020-01-01T00:00:00Z",
            PROP_SHA512: sha512(evil_bytes),
        },
    )
    assert theirs["owner"] != ours["owner"]
    capsys.readouterr()

    assert sync(config) == 0
    on_lab2 = images_named(lab, "lab2", name)
    assert [i["id"] for i in on_lab2] == [copy["id"]]  # never copied
    still = glance_client(lab, "lab1", admin=True).images.get(theirs["id"])
    assert still["status"] == "active" and not still["os_hidden"]  # never retired
    capsys.readouterr()

    for cloud, wanted in (("lab1", ours["id"]), ("lab2", copy["id"])):
        assert check(config, name, cloud, fresh=True) == 0
        assert capsys.readouterr().out.strip() == wanted  # never the foreign id

    assert status(config) == 0
    out = capsys.readouterr().out
    assert out.count(f"ignored: owned by project {theirs['owner']}") == 1
    assert f"lab1:{theirs['id'][:8]}" in out


def test_trusted_owners_make_another_projects_images_count(
    lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = uid("trusted")
    data = random_bytes(2000)
    theirs = foreign_upload(lab, "lab1", name, data)
    config = make_config(lab, tmp_path, name, clouds=["lab1", "lab2"], store=False)
    assert push(config, name) == 1  # only a foreign image: no version to copy
    assert f"ignored: owned by project {theirs['owner']}" in capsys.readouterr().out
    assert images_named(lab, "lab2", name) == []
    clouds = dict(config.clouds)
    import dataclasses

    clouds["lab1"] = dataclasses.replace(clouds["lab1"], trusted_owners=(theirs["owner"],))
    trusting = dataclasses.replace(config, clouds=clouds)
    assert push(trusting, name) == 0
    (copy,) = images_named(lab, "lab2", name)
    assert copy["os_hash_value"] == sha512(data)
