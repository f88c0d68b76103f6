"""``imagesync daemon`` as a child process, for the tests that need the real thing.

:class:`DaemonProcess` starts ``python -m imagesync.cli -c CONFIG daemon`` with an sd_notify
socket of its own (abstract namespace: nothing to clean up, no path length limit) and a
watchdog interval, and collects what it says from two threads: its notifications
(READY=1, STATUS=…, WATCHDOG=1, STOPPING=1) and its JSON log lines on stdout. Used by the unit
tests over directory stores and by the integration tests against the lab's clouds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any


class DaemonProcess:
    """A daemon process, its log lines and its notifications, collected as they come.

    ``after`` arguments are positions in ``notes`` (from :meth:`mark`): only what came
    later counts, with no clock involved.
    """

    def __init__(self, config: Path, *, watchdog_seconds: float = 2.0) -> None:
        name = f"imagesync-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name.encode())  # abstract namespace
        self.sock.settimeout(0.2)
        self.notes: list[str] = []
        self.lines: list[dict[str, Any]] = []
        env = {
            **os.environ,
            "NOTIFY_SOCKET": "@" + name,
            "WATCHDOG_USEC": str(int(watchdog_seconds * 1_000_000)),
        }
        env.pop("WATCHDOG_PID", None)  # set by a supervisor of the tests, it names another pid
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagesync.cli", "-c", str(config), "daemon"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._done = False
        threading.Thread(target=self._recv, daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _recv(self) -> None:
        while not self._done:
            try:
                note = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            self.notes.append(note)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))

    def mark(self) -> int:
        """Where the notifications are now: pass it as ``after`` to wait for a newer one."""
        return len(self.notes)

    def wait_note(self, what: str, timeout: float = 30.0, after: int = 0) -> str:
        """The first notification containing ``what`` (from position ``after`` on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for note in self.notes[after:]:
                if what in note:
                    return note
            time.sleep(0.05)
        raise AssertionError(f"no {what!r} notification; got {self.notes}")

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every log line so far whose event is ``name``."""
        return [x for x in list(self.lines) if x.get("event") == name]

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first log line whose event is ``name``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} log line; got {[x.get('event') for x in self.lines]}")

    def terminate(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took to exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - t0

    @property
    def closed(self) -> bool:
        """Has :meth:`close` run (the process is gone and its socket closed)?"""
        return self._done

    def stderr(self) -> str:
        """Everything the process wrote to stderr (once it has exited)."""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._done = True
        self.sock.close()
