"""The metrics listener: bounded handler threads, idle connections closed, public addresses.

Counted, not timed: threads are counted with ``threading.active_count()``; a closed
connection is seen as end-of-file on the client's socket (the socket's own timeout only bounds
a hang, far above the listener's).
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from imagesync.metrics import MAX_CONNECTIONS, Metrics

CLIENT_TIMEOUT = 30.0  # a hang bound for the client side, never reached when all is well


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.close()


def _idle(host: str, port: int) -> socket.socket:
    """A connection that sends nothing (a stuck or hostile client)."""
    s = socket.create_connection((host, port), timeout=CLIENT_TIMEOUT)
    return s


def _scrape(host: str, port: int) -> str:
    url = f"http://{host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=CLIENT_TIMEOUT) as resp:
        return str(resp.read().decode())


def test_idle_connections_do_not_pile_up_threads(metrics: Metrics) -> None:
    before = threading.active_count()
    host, port = metrics.serve("127.0.0.1:0")
    idle = [_idle(host, port) for _ in range(5 * MAX_CONNECTIONS)]
    try:
        # accepted in order, so the idle ones are all in before this answers
        assert "imagesync_copies_total" in _scrape(host, port)
        # the serving thread, and at most MAX_CONNECTIONS connection threads
        assert threading.active_count() - before <= 1 + MAX_CONNECTIONS
        # and it still answers, again and again
        for _ in range(3):
            assert "imagesync_transfers_in_flight" in _scrape(host, port)
    finally:
        for s in idle:
            s.close()


def test_the_oldest_connection_makes_room(metrics: Metrics) -> None:
    host, port = metrics.serve("127.0.0.1:0", max_connections=2)
    first, second = _idle(host, port), _idle(host, port)
    try:
        assert "imagesync_copies_total" in _scrape(host, port)  # the third: first must go
        assert first.recv(1) == b""  # closed by the listener
    finally:
        first.close()
        second.close()


def test_an_idle_connection_is_closed(metrics: Metrics) -> None:
    host, port = metrics.serve("127.0.0.1:0", idle_timeout=0.2)
    s = _idle(host, port)
    try:
        assert s.recv(1) == b""  # the listener gave up on it (the client would wait 30 s)
    finally:
        s.close()
    assert "imagesync_copies_total" in _scrape(host, port)


def test_a_public_address_is_served_with_a_warning(metrics: Metrics) -> None:
    with capture_logs() as logs:
        _host, port = metrics.serve("0.0.0.0:0")
    assert "imagesync_copies_total" in _scrape("127.0.0.1", port)
    (warning,) = [e for e in logs if e["event"] == "metrics.listening_public"]
    assert warning["log_level"] == "warning" and warning["address"] == "0.0.0.0:0"


def test_a_loopback_address_is_served_quietly(metrics: Metrics) -> None:
    with capture_logs() as logs:
        metrics.serve("127.0.0.1:0")
    assert not [e for e in logs if e["event"] == "metrics.listening_public"]
