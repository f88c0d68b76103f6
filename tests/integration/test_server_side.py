"""Server-side copies against the lab (issue 12.3): the lab's Glance offers ``web-download``
(``GET /v2/info/import``) and may fetch from loopback; the lab's VOSpace service answers a pull
with a pre-authorized URL. Each test puts a version in the store through imagesync (from lab1,
so the store's node carries its sha512), then copies it from the store to lab2.

- the store → cloud copy is done by Glance itself: 0 bytes through imagesync, verified;
- a URL serving other bytes (the lab VOSpace's ``corrupt`` fault on pre-authorized reads)
  gives an import that does not verify: it is deleted and the copy relayed;
- a cloud with ``server_side: false`` gets the relayed copy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import pytest
from structlog.testing import capture_logs

from imagesync.commands import push, sync
from imagesync.config.types import Config
from imagesync.lab import LabInfo, LabVOSpace
from imagesync.lab.vospace import Fault, set_faults
from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_STATE
from imagesync.sites.glance import GlanceSite
from imagesync.state import State
from tests.integration.labcfg import images_named, random_bytes, sha512, uid, upload
from tests.integration.test_vospace_sync import config_with_store

pytestmark = pytest.mark.integration
MB = 1 << 20


def _in_store_only(
    lab: LabInfo, store: LabVOSpace, tmp_path: Path, name: str, data: bytes
) -> Config:
    """Put ``data`` in the store through imagesync (from lab1); return a config whose only
    source of ``name`` is the store and whose target is lab2."""
    upload(lab, "lab1", name, data)
    assert push(config_with_store(lab, store, tmp_path / "in", name, ["lab1"]), name) == 0
    return config_with_store(lab, store, tmp_path / "out", name, ["lab2"])


def _rows(config: Config, name: str) -> list[dict[str, Any]]:
    return [h for h in State(config.state_dir).history(name) if h["target"] == "lab2"]


def _the_copy(lab: LabInfo, name: str, data: bytes) -> dict[str, Any]:
    (copy,) = images_named(lab, "lab2", name)  # hidden ones too: nothing else is left
    assert copy["status"] == "active" and not copy["os_hidden"]
    assert copy["os_hash_value"] == sha512(data) and copy["size"] == len(data)
    assert copy[PROP_SHA512] == sha512(data) and PROP_STATE not in copy
    return copy


def test_the_labs_glance_offers_web_download(lab: LabInfo, tmp_path: Path) -> None:
    config = config_with_store(lab, lab.vospace, tmp_path, "x", ["lab2"])  # type: ignore[arg-type]
    site = GlanceSite(config.clouds["lab2"])
    info = site.adapter.get("/v2/info/import").json()
    assert "web-download" in info["import-methods"]["value"]
    assert site.imports_urls() and site.imports_urls()  # asked once, remembered
    off = GlanceSite(dataclasses.replace(config.clouds["lab2"], server_side=False))
    assert not off.imports_urls()


def test_a_version_in_the_store_reaches_a_cloud_by_web_download(
    lab: LabInfo, lab_vospace: LabVOSpace, tmp_path: Path
) -> None:
    name = uid("ss-pull")
    data = random_bytes(4 * MB + 11)
    config = _in_store_only(lab, lab_vospace, tmp_path, name, data)
    with capture_logs() as logs:
        assert sync(config) == 0
    copy = _the_copy(lab, name, data)
    assert copy[PROP_ORIGIN].startswith("lab1:")  # the version's provenance travels
    (row,) = _rows(config, name)
    assert row["result"] == "ok" and row["bytes"] == 0  # nothing passed through imagesync
    (done,) = [e for e in logs if e["event"] == "copy.server_side"]
    assert "preauth:…" in done["source"]
    assert lab_vospace.token not in repr(logs)


@pytest.mark.parametrize("fault", ["corrupt", "cut"])
def test_an_import_of_other_bytes_is_deleted_and_the_copy_relayed(
    lab: LabInfo, lab_vospace: LabVOSpace, tmp_path: Path, fault: Literal["corrupt", "cut"]
) -> None:
    """corrupt: Glance imports other bytes (it checks no hash); cut: the URL's body ends
    early (Glance fails the import, or keeps a truncated image: either way it is caught)."""
    name = uid(f"ss-{fault}")
    data = random_bytes(2 * MB + 3)
    config = _in_store_only(lab, lab_vospace, tmp_path, name, data)
    # pre-authorized reads go wrong; imagesync's own reads (/files/) are right
    rule = Fault(fault, method="GET", path="/preauth:", after_bytes=MB)
    set_faults(lab_vospace.directory, [rule])
    with capture_logs() as logs:
        assert sync(config) == 0
    _the_copy(lab, name, data)  # the relayed copy, and nothing else
    (row,) = _rows(config, name)
    assert row["result"] == "ok" and row["bytes"] == len(data)
    (fallback,) = [e for e in logs if e["event"] == "copy.server_side_fallback"]
    assert "preauth:…" in fallback["error"]
    if fault == "corrupt":
        assert fallback["kind"] == "integrity"
    grants = [e for e in logs if "preauth:" in repr(e) and "preauth:…" not in repr(e)]
    assert grants == []  # the grant is never shown


def test_a_cloud_with_server_side_off_gets_the_relayed_copy(
    lab: LabInfo, lab_vospace: LabVOSpace, tmp_path: Path
) -> None:
    name = uid("ss-off")
    data = random_bytes(MB + 1)
    config = _in_store_only(lab, lab_vospace, tmp_path, name, data)
    off = dataclasses.replace(config.clouds["lab2"], server_side=False)
    config = dataclasses.replace(config, clouds={**config.clouds, "lab2": off})
    with capture_logs() as logs:
        assert sync(config) == 0
    _the_copy(lab, name, data)
    (row,) = _rows(config, name)
    assert row["bytes"] == len(data)
    assert not [e for e in logs if e["event"].startswith("copy.server_side")]
