"""A rule's boot_test against the lab's real Nova, through the daemon's passes: a new version
is booted on lab1 before it spreads (passed: marked, then copied to lab2); a version that does
not boot (the fake driver's boot failure switch) is quarantined: hidden on lab1 with the
reason, not copied, shown by ``status``, counted by the metric, and lab2's ``check`` still
answers the previous good version."""

from __future__ import annotations

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
        assert bad["os_hidden"] is True and "boot test on lab1 failed" in bad[QUARANTINED]
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
