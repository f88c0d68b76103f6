"""``imagesync daemon`` as a process, over two directory stores (no servers): sd_notify
READY/STATUS/WATCHDOG/STOPPING to a socket of the test's own, SIGHUP with an invalid then a
valid configuration, SIGTERM → exit 0, JSON log lines on stdout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagesync.model import NewImage
from imagesync.sites.directory import DirectorySite


def _config(tmp_path: Path, pattern: str = "img-*", poll: str = "1s") -> str:
    return f"""\
state_dir: {tmp_path / 'state'}
poll_interval: {poll}
stores:
  a: {{type: directory, path: {tmp_path / 'a'}}}
  b: {{type: directory, path: {tmp_path / 'b'}}}
images:
  - name: "{pattern}"
    stores: [a, b]
"""


def _put(root: Path, name: str, data: bytes) -> None:
    site = DirectorySite("a", root)
    w = site.create(NewImage(name=name, disk_format="raw", container_format="bare",
                             min_disk=0, min_ram=0, properties={}, size=len(data)))
    w.write(data)
    site.publish(w.finish().id)


class Daemon:
    """A daemon process, its log lines and its notifications, collected by threads."""

    def __init__(self, config: Path, sock_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(sock_path)
        self.sock.settimeout(0.2)
        self.notes: list[tuple[float, str]] = []
        self.lines: list[dict[str, Any]] = []
        env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}
        env.pop("WATCHDOG_PID", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagesync.cli", "-c", str(config), "daemon"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._stop = False
        threading.Thread(target=self._recv, daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()

    def _recv(self) -> None:
        while not self._stop:
            try:
                note = self.sock.recv(4096).decode()
                self.notes.append((time.monotonic(), note))
            except TimeoutError:
                continue
            except OSError:
                return

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def wait_for(self, what: str, timeout: float = 15.0, after: float = 0.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, note in list(self.notes):
                if t >= after and what in note:
                    return note
            time.sleep(0.05)
        raise AssertionError(f"no {what!r} notification; got {self.notes}")

    def wait_event(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.get("event") == event:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} log line; got {[x.get('event') for x in self.lines]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stop = True
        self.sock.close()


@pytest.fixture()
def sock_path() -> Iterator[str]:
    path = f"/tmp/isd-{uuid.uuid4().hex[:10]}.sock"  # short: AF_UNIX paths are limited
    try:
        yield path
    finally:
        Path(path).unlink(missing_ok=True)


def test_daemon_process_notifies_reloads_and_stops(tmp_path: Path, sock_path: str) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    _put(tmp_path / "a", "img-1", b"one" * 1000)
    config = tmp_path / "imagesync.yaml"
    config.write_text(_config(tmp_path))
    d = Daemon(config, sock_path)
    try:
        d.wait_for("READY=1")
        status = d.wait_for("STATUS=last pass")
        assert "1 copies, 0 failed" in status
        assert list((tmp_path / "b" / "img-1").glob("*.img"))
        first_dog = d.wait_for("WATCHDOG=1")
        assert first_dog == "WATCHDOG=1"
        started = d.wait_event("daemon.started")
        assert started["level"] == "info" and started["sites"] == ["a", "b"]
        assert d.wait_event("copy.done")["target"] == "b"

        # SIGHUP with a broken file: logged, the old configuration keeps running
        config.write_text("stores: [oops\n")
        d.proc.send_signal(signal.SIGHUP)
        failed = d.wait_event("config.reload_failed")
        assert str(config) in failed["error"] and failed["level"] == "error"
        mark = time.monotonic()
        d.wait_for("STATUS=last pass", after=mark)  # passes go on
        d.wait_for("WATCHDOG=1", after=mark)
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

        mark = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        assert time.monotonic() - mark < 10
        d.wait_for("STOPPING=1", after=mark)
        assert d.wait_event("daemon.stopped")
        assert d.proc.stderr is not None
        err = d.proc.stderr.read()
        assert "Traceback" not in err, err
    finally:
        d.close()


def test_an_unbindable_metrics_address_fails_the_start(tmp_path: Path, sock_path: str) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    config = tmp_path / "imagesync.yaml"
    config.write_text(_config(tmp_path) + f"metrics_listen: 127.0.0.1:{port}\n")
    try:
        r = subprocess.run([sys.executable, "-m", "imagesync.cli", "-c", str(config), "daemon"],
                           capture_output=True, text=True, timeout=30)
    finally:
        blocker.close()
    assert r.returncode == 1
    (line,) = [json.loads(x) for x in r.stdout.splitlines()
               if '"metrics.listen_failed"' in x]
    assert line["listen"] == f"127.0.0.1:{port}"
