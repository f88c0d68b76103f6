"""``imagesync daemon`` as a process (``tests/daemonproc.py``), over two directory stores (no
servers): sd_notify READY/STATUS/WATCHDOG/STOPPING to a socket of the test's own, SIGHUP with
an invalid then a valid configuration, SIGTERM → exit 0, JSON log lines on stdout."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from imagesync.model import NewImage
from imagesync.sites.directory import DirectorySite
from tests.daemonproc import DaemonProcess


def _config(tmp_path: Path, pattern: str = "img-*", poll: str = "1s") -> str:
    return f"""\
state_dir: {tmp_path / "state"}
poll_interval: {poll}
stores:
  a: {{type: directory, path: {tmp_path / "a"}}}
  b: {{type: directory, path: {tmp_path / "b"}}}
images:
  - name: "{pattern}"
    stores: [a, b]
"""


def _put(root: Path, name: str, data: bytes) -> None:
    site = DirectorySite("a", root)
    w = site.create(
        NewImage(
            name=name,
            disk_format="raw",
            container_format="bare",
            min_disk=0,
            min_ram=0,
            properties={},
            size=len(data),
        )
    )
    w.write(data)
    site.publish(w.finish().id)


def test_daemon_process_notifies_reloads_and_stops(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    _put(tmp_path / "a", "img-1", b"one" * 1000)
    config = tmp_path / "imagesync.yaml"
    config.write_text(_config(tmp_path))
    with DaemonProcess(config, watchdog_seconds=1.0) as d:
        d.wait_note("READY=1")
        status = d.wait_note("STATUS=last pass")
        assert "1 copies, 0 failed" in status
        assert list((tmp_path / "b" / "img-1").glob("*.img"))
        first_dog = d.wait_note("WATCHDOG=1")
        assert first_dog == "WATCHDOG=1"
        started = d.wait_event("daemon.started")
        assert started["level"] == "info" and started["sites"] == ["a", "b"]
        assert d.wait_event("copy.done")["target"] == "b"

        # SIGHUP with a broken file: logged, the old configuration keeps running
        config.write_text("stores: [oops\n")
        d.proc.send_signal(signal.SIGHUP)
        failed = d.wait_event("config.reload_failed")
        assert str(config) in failed["error"] and failed["level"] == "error"
        mark = d.mark()
        d.wait_note("STATUS=last pass", after=mark)  # passes go on
        d.wait_note("WATCHDOG=1", after=mark)
        assert d.proc.poll() is None

        # SIGHUP with a valid file that manages one more name: applied
        _put(tmp_path / "a", "new-1", b"two" * 1000)
        config.write_text(_config(tmp_path, pattern="*"))
        d.proc.send_signal(signal.SIGHUP)
        d.wait_event("config.reloaded")
        deadline = time.monotonic() + 15
        while not list((tmp_path / "b" / "new-1").glob("*.img")):
            assert time.monotonic() < deadline, "the reloaded rule was not applied"
            time.sleep(0.1)

        mark = d.mark()
        code, _ = d.terminate()
        assert code == 0
        d.wait_note("STOPPING=1", after=mark)
        # wound down within the grace period, not abandoned at its end
        assert d.wait_event("daemon.stopped") and not d.events("daemon.abandoned")
        err = d.stderr()
        assert "Traceback" not in err, err


def test_an_unbindable_metrics_address_fails_the_start(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    config = tmp_path / "imagesync.yaml"
    config.write_text(_config(tmp_path) + f"metrics_listen: 127.0.0.1:{port}\n")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "imagesync.cli", "-c", str(config), "daemon"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        blocker.close()
    assert r.returncode == 1
    (line,) = [json.loads(x) for x in r.stdout.splitlines() if '"metrics.listen_failed"' in x]
    assert line["listen"] == f"127.0.0.1:{port}"


def test_a_coordinated_daemon_exits_on_sigterm(tmp_path: Path) -> None:
    """tooz imports eventlet (through futurist); imported from the pass's thread, eventlet
    leaves that thread impossible to join, and the process hung at exit after logging
    ``daemon.stopped`` until killed. The service is unreachable here (a closed port): each
    pass fails to join, which imports tooz just the same."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing answers there
    config = tmp_path / "imagesync.yaml"
    config.write_text(
        _config(tmp_path)
        + f"coordination:\n  url: etcd3+http://127.0.0.1:{port}\n  lease_timeout: 4s\n"
    )
    with DaemonProcess(config) as d:
        d.wait_event("pass.failed")
        code, _ = d.terminate(timeout=30)  # a hang, not a slow exit: it never ended by itself
        assert code == 0
        assert d.events("daemon.stopped")
