"""Debian tools some tests drive (``chromium``, Prometheus's ``promtool``), installed with apt
when missing, so that README's one test command (which ``.ci/run`` runs) needs no other step.

Where they cannot be installed (no apt, not root) the test fails with one line naming the
package to install: tests that need a tool never skip silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

_lock = threading.Lock()
#: apt waits for another apt (or another test session) rather than failing at once
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-q"]


def ensure_tool(path: str, package: str) -> Path:
    """``path`` (e.g. ``/usr/bin/chromium``), after ``apt-get install -y PACKAGE`` if needed."""
    tool = Path(path)
    with _lock:
        if tool.exists():
            return tool
        how = f"install Debian's {package} (apt-get install -y {package}) to run this test"
        if shutil.which("apt-get") is None:
            pytest.fail(f"{path} is missing and there is no apt-get here: {how}", pytrace=False)
        if os.geteuid() != 0:
            pytest.fail(f"{path} is missing and installing needs root: {how}", pytrace=False)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [*APT, "install", "--no-install-recommends", package]
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run([*APT, "update"], env=env, capture_output=True, timeout=900)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not tool.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.fail(f"could not install {package} ({last}): {how}", pytrace=False)
        return tool
