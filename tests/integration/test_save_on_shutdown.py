"""Save on shutdown against the lab's real Nova, through the daemon's passes (``Daemon``): a
marked server that is stopped is snapshotted once, the result is written on the server, the
new version reaches lab2 and the store in the same pass and lab2's ``check`` answers with it;
a pass without a new shutdown makes no second snapshot, a boot and a stop makes one; a name
that no rule matches is refused on the server and shown by ``status``."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from imagesync.check import check
from imagesync.commands import status
from imagesync.daemon import Daemon
from imagesync.engine import Engine
from imagesync.lab import LabInfo
from imagesync.lab.nova import snapshot_data
from imagesync.saving import SAVE_AS, SAVE_ERROR, SAVED, SaveState
from tests.integration.labcfg import fresh_image, images_named, make_config, nova_server

pytestmark = pytest.mark.integration


@contextmanager
def _daemon(lab: LabInfo, tmp_path: Path, name: str) -> Iterator[Daemon]:
    """The daemon of a config syncing ``name`` from lab1 to lab2 and the store; shut down at
    the end."""
    daemon = Daemon(make_config(lab, tmp_path, name, clouds=["lab1", "lab2"]))
    try:
        yield daemon
    finally:
        daemon.shutdown()


def _snapshots(lab: LabInfo, cloud: str, name: str, base_id: str) -> list[dict[str, Any]]:
    return [i for i in images_named(lab, cloud, name) if i["id"] != base_id]


def test_a_marked_server_is_saved_once_per_shutdown_and_spreads(
    nova_lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, base = fresh_image(nova_lab, "save")
    marked = {SAVE_AS: name}
    with (
        _daemon(nova_lab, tmp_path, name) as daemon,
        nova_server(nova_lab, name, base["id"], metadata=marked) as (nova, sid),
    ):
        cfg = daemon.config
        report = daemon.run_pass()  # running: nothing to save; the base spreads
        assert report is not None and report.ok
        assert [o.state for o in daemon._watch.saves if o.server_id == sid] == [
            SaveState.NOT_SHUTOFF
        ]
        assert _snapshots(nova_lab, "lab1", name, base["id"]) == []

        t0 = time.monotonic()
        nova.stop(sid)
        report = daemon.run_pass()
        propagated = time.monotonic() - t0
        assert report is not None and report.ok, report
        (saved,) = [o for o in daemon._watch.saves if o.server_id == sid]
        assert saved.state is SaveState.SAVED and saved.image_id
        meta = nova.get(sid)["metadata"]
        assert meta[SAVED].split()[0] == saved.image_id and SAVE_ERROR not in meta
        expected = hashlib.sha512(snapshot_data(sid)).hexdigest()
        (on_lab2,) = [
            i
            for i in images_named(nova_lab, "lab2", name)
            if i.get("imagesync.origin") == f"lab1:{saved.image_id}"
        ]
        assert on_lab2["os_hash_value"] == expected
        store = Engine(cfg)
        try:
            held = store.inventories(name=name)["archive"].images
        finally:
            store.close()
        assert expected in {r.hashes.get("sha512") for r in held}
        capsys.readouterr()
        assert check(cfg, name, "lab2", fresh=True) == 0
        assert capsys.readouterr().out.strip() == on_lab2["id"]
        print(f"shutdown-to-propagated on lab2: {propagated:.1f} s")

        # stays off: no second snapshot
        report = daemon.run_pass()
        assert report is not None and report.ok
        assert [o.state for o in daemon._watch.saves if o.server_id == sid] == [
            SaveState.UP_TO_DATE
        ]
        assert len(_snapshots(nova_lab, "lab1", name, base["id"])) == 1

        # booted and stopped again: saved again
        nova._call("POST", f"/servers/{sid}/action", json={"os-start": None})
        nova.wait(sid, "ACTIVE")
        nova.stop(sid)
        daemon.run_pass()
        (again,) = [o for o in daemon._watch.saves if o.server_id == sid]
        assert again.state is SaveState.SAVED and again.image_id != saved.image_id
        assert nova.get(sid)["metadata"][SAVED].split()[0] == again.image_id


def test_a_name_outside_the_rules_is_refused_on_the_server_and_in_status(
    nova_lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, base = fresh_image(nova_lab, "save")
    stray = f"{name}-nope"
    with (
        _daemon(nova_lab, tmp_path, name) as daemon,
        nova_server(nova_lab, name, base["id"], metadata={SAVE_AS: stray}) as (nova, sid),
    ):
        nova.stop(sid)
        daemon.run_pass()
        (refused,) = [o for o in daemon._watch.saves if o.server_id == sid]
        assert refused.state is SaveState.REFUSED
        meta = nova.get(sid)["metadata"]
        assert "refused" in meta[SAVE_ERROR] and stray in meta[SAVE_ERROR]
        assert SAVED not in meta
        assert images_named(nova_lab, "lab1", stray) == []
        assert _snapshots(nova_lab, "lab1", name, base["id"]) == []
        capsys.readouterr()
        assert status(daemon.config) == 0
        out = capsys.readouterr().out
        assert sid in out and "refused" in out
        assert status(daemon.config, as_json=True) == 0  # and in status --json, and on the page
        (row,) = [r for r in json.loads(capsys.readouterr().out)["saves"] if r["server"] == sid]
        assert row["save_as"] == stray and row["state"].startswith("ERROR: refused")
        (live,) = [r for r in daemon.live.document()["saves"] if r["server"] == sid]
        assert live["state"] == "refused" and stray in live["error"]
