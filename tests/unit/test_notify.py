"""sd_notify: datagrams to a socket of the test's own (a path, and the abstract namespace)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagesync.notify import Notifier, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # AF_UNIX paths are limited to 108 bytes
        path = Path(f"/tmp/isn-{uuid.uuid4().hex[:8]}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        yield sock, str(path)
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(env={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready(status="first pass")
    assert sock.recv(4096) == b"READY=1\nSTATUS=first pass"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("last pass 12:00:01: 3 copies,\n0 failed")
    assert sock.recv(4096) == b"STATUS=last pass 12:00:01: 3 copies, 0 failed"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_messages_reach_an_abstract_socket() -> None:
    name = f"imagesync-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        n = Notifier(env={"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_without_a_socket_nothing_is_sent() -> None:
    n = Notifier(env={})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False


def test_a_missing_socket_is_not_fatal(tmp_path: Path) -> None:
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.watchdog() is False
    assert n.watchdog() is False  # and it only complained once


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "120000000"}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
