"""Prometheus's own ``promtool`` (Debian's ``prometheus`` package, installed when missing)
checks etc/prometheus/imagesync-alerts.yaml, and runs the behaviour tests in
tests/prometheus/imagesync-alerts-test.yaml: each alert fires when it should, not before, and
not for what it should ignore. (Under tests/integration: it may need apt, like chromium.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.debpkg import ensure_tool

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "etc" / "prometheus" / "imagesync-alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "imagesync-alerts-test.yaml"


@pytest.fixture(scope="session")
def promtool() -> Path:
    return ensure_tool("/usr/bin/promtool", "prometheus")


@pytest.mark.parametrize(
    ("command", "path"), [("check", ALERTS), ("test", ALERT_TESTS)], ids=["check", "test"]
)
def test_promtool_accepts_the_alerts(promtool: Path, command: str, path: Path) -> None:
    done = subprocess.run(
        [str(promtool), command, "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
