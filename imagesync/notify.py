"""systemd's notification protocol (sd_notify) without a dependency: READY, STATUS, WATCHDOG.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a unix datagram socket (a path, or an
abstract name written with a leading ``@``) to which the service sends ``KEY=VALUE`` lines.
With ``WatchdogSec=`` it also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``): the service
must send ``WATCHDOG=1`` more often than that, or systemd kills and restarts it. Outside systemd
(no socket) every call does nothing, so the daemon needs no "am I under systemd?" branches.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping

import structlog

log = structlog.get_logger("imagesync.notify")


def _address(value: str) -> str | bytes:
    # '@name' is Linux's abstract namespace: the address starts with a NUL byte.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` (or ``socket_path``); a no-op without one."""

    def __init__(
        self, socket_path: str | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if env is None else env
        path = socket_path if socket_path is not None else env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = _address(path) if path else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; True if it was sent."""
        if self.address is None or not fields:
            return False
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)  # never stall the daemon on its supervisor
                self._sock.sendto(payload, self.address)
            except OSError as exc:
                if not self._warned:  # once: a broken socket would otherwise log every ping
                    log.warning("notify.failed", error=str(exc))
                    self._warned = True
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when systemd
    does not watch this process."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (our parent, say)
    return usec / 2_000_000
