"""The lab's process helpers: telling a starting service from a dead one."""

from __future__ import annotations

import sys
from pathlib import Path

from imagesync.lab import procs


def test_a_started_service_that_rewrites_its_argv_still_counts_as_running(tmp_path: Path) -> None:
    # uWSGI rewrites what /proc/<pid>/cmdline shows while it starts; the lab once took a
    # keystone that way for one that had exited, and every integration test failed with it.
    # Here the argv never shows the marker at all (as after such a rewrite): the process this
    # test started still counts as running until it ends.
    marker = str(tmp_path / "svc.pid")
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    pid = procs.start_service(argv, tmp_path / "svc.log", {})
    try:
        assert marker not in procs.cmdline(pid)
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
