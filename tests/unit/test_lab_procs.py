"""The lab's process helpers: telling a starting service from a dead one."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from imagesync.lab import procs


def test_a_started_service_that_rewrites_its_argv_still_counts_as_running(tmp_path: Path) -> None:
    # uWSGI rewrites what /proc/<pid>/cmdline shows while it starts; the lab once took a
    # keystone that way for one that had exited, and every integration test failed with it.
    marker = str(tmp_path / "svc.pid")
    argv = [
        "/bin/sh",
        "-c",
        f"exec {sys.executable} -c 'import time; time.sleep(30)'",
        "--pidfile",
        marker,
    ]
    pid = procs.start_service(argv, tmp_path / "svc.log", {})
    try:
        deadline = time.monotonic() + 10
        while marker in procs.cmdline(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker not in procs.cmdline(pid), "the shell did not exec"
        assert procs.is_running(pid, marker)
    finally:
        child = procs._CHILDREN[pid]
        child.kill()
        child.wait()
    assert not procs.is_running(pid, marker)


def test_a_pid_this_process_did_not_start_needs_its_marker(tmp_path: Path) -> None:
    import os

    assert procs.is_running(os.getpid(), procs.cmdline(os.getpid())[0]) is True
    assert procs.is_running(os.getpid(), str(tmp_path / "no-such-pidfile")) is False
    assert procs.is_running(None, "") is False
