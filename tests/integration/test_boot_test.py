"""A rule's boot_test against the lab's real Nova, through the daemon's passes: a new version
is booted on lab1 before it spreads (passed: marked, then copied to lab2); a version that does
not boot (the fake driver's boot failure switch) is quarantined: marked on lab1 with the
reason (hidden when imagesync made that image), not copied, shown by ``status`` (text and
``--json``), counted by the metric, and ``check`` still answers the previous good version.
A version first uploaded elsewhere (lab2) is copied to lab1 hidden and booted there first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagesync.boottest import QUARANTINED, TESTED
from imagesync.check import check
from imagesync.commands import status
from imagesync.config.types import BootTest
from imagesync.daemon import Daemon
from imagesync.lab import LabInfo, glance_client
from imagesync.lab.nova import fail_file
from tests.integration.labcfg import fresh_image, images_named, make_config, random_bytes, upload

pytestmark = pytest.mark.integration


def test_a_version_boots_before_it_spreads_and_one_that_does_not_is_quarantined(
    nova_lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, v1 = fresh_image(nova_lab, "boot")
    cfg = make_config(
        nova_lab,
        tmp_path,
        name,
        clouds=["lab1", "lab2"],
        store=False,
        boot_test=BootTest(cloud="lab1", flavor="lab.tiny", timeout=60),
    )
    daemon = Daemon(cfg)
    failing = fail_file(nova_lab.directory / "lab1")
    try:
        report = daemon.run_pass()
        assert report is not None and report.ok, report
        assert glance_client(nova_lab, "lab1").images.get(v1["id"])[TESTED].startswith("passed")
        (copy1,) = images_named(nova_lab, "lab2", name)
        assert copy1["imagesync.origin"] == f"lab1:{v1['id']}"
        assert daemon.metrics.boot_tests.labels(result="passed")._value.get() == 1

        failing.write_text("boot\n")
        v2 = upload(nova_lab, "lab1", name, random_bytes(8192))
        report = daemon.run_pass()
        assert report is not None and report.ok, report
        bad = glance_client(nova_lab, "lab1").images.get(v2["id"])
        # the user's own upload: marked, left visible (imagesync hides only what it made)
        assert bad["os_hidden"] is False and "boot test on lab1 failed" in bad[QUARANTINED]
        assert [i["id"] for i in images_named(nova_lab, "lab2", name)] == [copy1["id"]]
        assert daemon.metrics.boot_tests.labels(result="error")._value.get() == 1
        capsys.readouterr()
        assert check(cfg, name, "lab2", fresh=True) == 0
        assert capsys.readouterr().out.strip() == copy1["id"]
        assert status(cfg) == 0
        assert f"QUARANTINED on lab1 ({v2['id']})" in capsys.readouterr().out

        report = daemon.run_pass()  # quarantined stays put: not tested again, not copied
        assert report is not None and report.ok
        assert daemon.metrics.boot_tests.labels(result="error")._value.get() == 1
        assert [i["id"] for i in images_named(nova_lab, "lab2", name)] == [copy1["id"]]
    finally:
        failing.unlink(missing_ok=True)
        daemon.shutdown()


def test_a_version_from_another_cloud_is_booted_on_the_test_cloud_before_it_spreads(
    nova_lab: LabInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Uploaded to lab2 with the boot test on lab1: it reaches lab1 first (hidden), boots,
    then spreads to lab3 and the store. A failing one is quarantined on lab1 and never reaches
    lab3 or the store, while check keeps the previous version everywhere, on lab2 (where the
    user's failing upload stays visible: imagesync hides only what it made) too."""
    name, v1 = fresh_image(nova_lab, "boot2", cloud="lab2")
    cfg = make_config(
        nova_lab,
        tmp_path,
        name,
        clouds=["lab1", "lab2", "lab3"],
        boot_test=BootTest(cloud="lab1", flavor="lab.tiny", timeout=60),
    )
    store = tmp_path / "store"
    daemon = Daemon(cfg)
    failing = fail_file(nova_lab.directory / "lab1")
    try:
        # one pass: copied to lab1 alone (hidden), booted there, shown, then spread
        report = daemon.run_pass()
        assert report is not None and report.ok and report.copied == 3, report
        (tested,) = images_named(nova_lab, "lab1", name)
        assert tested["imagesync.origin"] == f"lab2:{v1['id']}"
        assert tested["os_hidden"] is False and tested[TESTED].startswith("passed")
        (copy3,) = images_named(nova_lab, "lab3", name)
        assert _stored(store) == 1

        failing.write_text("boot\n")
        v2 = upload(nova_lab, "lab2", name, random_bytes(8192))
        assert _pass_ok(daemon)  # v2 to lab1, hidden; booted: fails, quarantined
        bad = [i for i in images_named(nova_lab, "lab1", name) if i["id"] != tested["id"]]
        assert len(bad) == 1 and bad[0]["os_hidden"] is True
        assert "boot test on lab1 failed" in bad[0][QUARANTINED]
        assert daemon.metrics.boot_tests.labels(result="error")._value.get() == 1
        assert _pass_ok(daemon)  # remembered: not copied again, not booted again
        assert daemon.metrics.boot_tests.labels(result="error")._value.get() == 1
        assert [i["id"] for i in images_named(nova_lab, "lab3", name)] == [copy3["id"]]
        assert _stored(store) == 1
        lab2 = {i["id"]: i for i in images_named(nova_lab, "lab2", name)}
        assert lab2[v2["id"]]["os_hidden"] is False  # the user's own upload: left as it is
        for cloud, want in (("lab1", tested["id"]), ("lab2", v1["id"]), ("lab3", copy3["id"])):
            capsys.readouterr()
            assert check(cfg, name, cloud, fresh=True) == 0
            assert capsys.readouterr().out.strip() == want, cloud
        assert status(cfg, as_json=True) == 0
        doc = json.loads(capsys.readouterr().out)
        (q,) = [q for q in doc["quarantined"] if q["name"] == name]
        assert (q["site"], q["image_id"], q["origin"]) == ("lab1", bad[0]["id"], f"lab2:{v2['id']}")
        assert "saves" in doc
        assert q in daemon.live.document()["quarantined"]  # the daemon's page and status.json

        # released (README): the mark removed, the version is booted again and spreads
        failing.unlink()
        bad_id = bad[0]["id"]
        # what `openstack image unset --property imagesync.quarantined ID` sends (the CLI
        # alone would add seconds of start-up to this test)
        glance_client(nova_lab, "lab1").images.update(bad_id, remove_props=[QUARANTINED])
        assert _pass_ok(daemon)
        released = glance_client(nova_lab, "lab1").images.get(bad_id)
        assert released["os_hidden"] is False and released[TESTED].startswith("passed")
        assert {i["imagesync.origin"] for i in images_named(nova_lab, "lab3", name)} == {
            f"lab2:{v1['id']}",
            f"lab2:{v2['id']}",
        }
        assert _stored(store) == 2
    finally:
        failing.unlink(missing_ok=True)
        daemon.shutdown()


def _pass_ok(daemon: Daemon) -> bool:
    report = daemon.run_pass()
    assert report is not None and report.ok, report
    return True


def _stored(store: Path) -> int:
    """Images in the directory store (their metadata files, published ones only)."""
    return len([p for p in store.rglob("*.json") if not p.name.startswith(".")])
