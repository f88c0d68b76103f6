"""The machinery of the fault suite (``tests/faults.py``): the processes under test, the store
on a file system that can be filled, the boundary trap and the store watcher.

- :class:`Store`: the directory store on a tmpfs of its own (``mount`` needs root; without
  it a plain directory, and no full disk), filled to the last few bytes by a ballast file;
- :class:`Actors`: ``imagesync daemon`` (``tests/daemonproc.py``), ``push`` and ``sync``
  processes on one configuration, started, ``kill -9``ed and reaped, their output kept per
  round;
- :class:`Trap`: one ``kill -9`` at the lease boundary, by mode: ``lease`` kills the process
  the moment its lease row appears in the state database; ``publish`` holds the state
  database's write lock once data flows (so the process blocks dropping its lease right after
  ``publish()``), kills it as soon as the target shows the image published, and lets go;
- :class:`StoreWatch`: sees copies of the newest versions appear in the store and notices any
  that vanish between the rounds' surveys.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemonproc import DaemonProcess
from tests.faults_checks import STORE, Eyes, Guard, Survey, leases

REPO = Path(__file__).resolve().parent.parent


# -- the store on a small file system of its own ------------------------------------------------


class Store:
    """The directory store, on a tmpfs that a ballast file can fill (root), else a plain dir."""

    def __init__(self, root: Path, size_mb: int = 64) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.mounted = False
        self.why_not = ""
        try:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0750", "tmpfs", str(root)],
                check=True,
                capture_output=True,
                text=True,
            )
            self.mounted = True
        except (OSError, subprocess.CalledProcessError) as exc:
            err = getattr(exc, "stderr", "") or str(exc)
            self.why_not = f"mount -t tmpfs not permitted ({err.strip()[:120]})"
        self.ballast = root / ".ballast"
        self.filled = False

    def fill(self, leave: int) -> None:
        """Leave ``leave`` bytes free."""
        self.filled = True
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free > leave:
            fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                have = os.fstat(fd).st_size
                os.posix_fallocate(fd, 0, have + free - leave)
            except OSError:
                pass  # as full as it gets
            finally:
                os.close(fd)

    def empty(self) -> None:
        self.ballast.unlink(missing_ok=True)
        self.filled = False

    def close(self) -> None:
        self.empty()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False, capture_output=True)
            self.mounted = False


# -- the processes under test ---------------------------------------------------------------


@dataclass
class Proc:
    kind: str  # daemon, push, sync
    pid: int
    popen: subprocess.Popen[bytes] | None = None
    daemon: DaemonProcess | None = None

    def alive(self) -> bool:
        p = self.daemon.proc if self.daemon is not None else self.popen
        return p is not None and p.poll() is None


class Actors:
    """The imagesync processes of a round: start, kill, reap; their output kept per round."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.procs: list[Proc] = []
        self.lock = threading.Lock()
        self.round = 0
        self.started = 0  # numbers the output files
        self.reserved: set[int] = set()  # pids a trap waits for: random kills spare them

    def round_dir(self) -> Path:
        d = self.logs / f"round-{self.round:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "imagesync.cli",
            "-c",
            str(self.config),
            "--log-format",
            "json",
        ]

    def start_daemon(self) -> Proc:
        d = DaemonProcess(self.config, watchdog_seconds=30.0)
        p = Proc("daemon", d.proc.pid, daemon=d)
        with self.lock:
            self.procs.append(p)
        return p

    def start(self, kind: str, *args: str) -> Proc:
        d = self.round_dir()
        self.started += 1
        n = self.started
        with (
            open(d / f"{n:02d}-{kind}.out", "wb") as out,
            open(d / f"{n:02d}-{kind}.err", "wb") as err,
        ):
            popen = subprocess.Popen(
                [*self._command(), kind, *args],
                stdout=out,
                stderr=err,
                cwd=REPO,
            )
        p = Proc(kind, popen.pid, popen=popen)
        with self.lock:
            self.procs.append(p)
        return p

    def alive(self) -> list[Proc]:
        with self.lock:
            return [p for p in self.procs if p.alive()]

    def by_pid(self, pid: int) -> Proc | None:
        with self.lock:
            for p in self.procs:
                if p.pid == pid and p.alive():
                    return p
        return None

    def kill(self, p: Proc) -> bool:
        """kill -9; False when it had exited already."""
        if not p.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        self._reap(p)
        return True

    def _reap(self, p: Proc) -> None:
        if p.daemon is not None:
            p.daemon.proc.wait()
            self._keep_daemon_log(p)
        elif p.popen is not None:
            p.popen.wait()

    def _keep_daemon_log(self, p: Proc) -> None:
        assert p.daemon is not None
        d = p.daemon
        if not d.closed:
            d.close()
            with open(self.round_dir() / f"daemon-{p.pid}.log", "w") as f:
                for line in d.lines:
                    f.write(json.dumps(line) + "\n")
                with contextlib.suppress(Exception):
                    f.write(d.stderr())

    def terminate_daemon(self, p: Proc) -> None:
        assert p.daemon is not None
        try:
            p.daemon.terminate(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill(p)
        self._keep_daemon_log(p)

    def reap_finished(self) -> None:
        with self.lock:
            done = [p for p in self.procs if not p.alive()]
            self.procs = [p for p in self.procs if p.alive()]
        for p in done:
            self._reap(p)

    def run(self, *args: str, timeout: float = 300) -> tuple[int, str]:
        """A one-shot command to its end (the restart's sync, status): (exit code, stdout)."""
        d = self.round_dir()
        with open(d / f"{args[0]}-{time.monotonic_ns()}.err", "wb") as err:
            done = subprocess.run(
                [*self._command(), *args],
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                timeout=timeout,
                check=False,
            )
        return done.returncode, done.stdout.decode()


# -- the boundary trap ----------------------------------------------------------------------


@dataclass(eq=False, repr=False)  # a thread's identity and repr stay the thread's own
class Trap(threading.Thread):
    """Kills one process at the lease boundary (see the module's docstring)."""

    mode: str
    state_db: Path
    eyes: Eyes
    actors: Actors
    deadline: float
    clouds: set[str]
    hit: bool = field(default=False, init=False)
    detail: str = field(default="", init=False)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a trap that fails is a miss, never a crash of the suite
            self.detail = f"trap failed: {exc!r}"

    def _ours(self) -> list[tuple[str, str, str, int]]:
        """The leases of live processes of this round, the store's first (cheap to look at)."""
        found = [lease for lease in leases(self.state_db) if self.actors.by_pid(lease[3])]
        return sorted(found, key=lambda lease: lease[0] != STORE)

    def _published(self, site: str, name: str, image_id: str) -> bool:
        if site == STORE:
            return self.eyes.store_published(name, image_id)
        if site in self.clouds:
            seen = self.eyes.glance_image(site, image_id)
            return seen is not None and seen.published
        return False

    def _flowing(self, site: str, name: str, image_id: str) -> bool:
        if site == STORE:
            return self.eyes.store_flowing(name, image_id)
        seen = self.eyes.glance_image(site, image_id)
        return seen is not None and seen.status in ("saving", "active")

    def _run(self) -> None:
        while time.monotonic() < self.deadline:
            ours = self._ours()
            if ours:
                break
            time.sleep(0.02)
        else:
            self.detail = "no lease appeared"
            return
        site, image_id, _, pid = ours[0]
        proc = self.actors.by_pid(pid)
        if proc is None:
            self.detail = "the lease holder exited"
            return
        self.actors.reserved.add(pid)
        try:
            self._strike(proc, site, image_id)
        finally:
            self.actors.reserved.discard(pid)

    def _strike(self, proc: Proc, site: str, image_id: str) -> None:
        pid = proc.pid
        if self.mode == "lease":
            self.hit = self.actors.kill(proc)
            self.detail = f"{proc.kind} {pid} on its lease of {site}:{image_id}"
            return
        # publish: wait for data to flow (every upload of this copy exists and is leased by
        # then), then hold the write lock: dropping a lease now waits for us.
        while time.monotonic() < self.deadline and proc.alive():
            if any(self._flowing(s, n, i) for s, i, n, p in self._ours() if p == pid):
                break
            time.sleep(0.05)
        else:
            self.detail = "no data flowed" if proc.alive() else "killed before data flowed"
            return
        db = sqlite3.connect(self.state_db, timeout=2, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            hold_until = min(self.deadline, time.monotonic() + 8.0)
            while time.monotonic() < hold_until and proc.alive():
                for s, i, n, p in self._ours():
                    if p == pid and self._published(s, n, i):
                        self.hit = self.actors.kill(proc)
                        self.detail = f"{proc.kind} {pid}: {s}:{i} published, lease held"
                        return
                time.sleep(0.05)
            self.detail = "nothing published" if proc.alive() else "exited before publishing"
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()


# -- the store watcher ----------------------------------------------------------------------


class StoreWatch(threading.Thread):
    """Sees newest copies appear in the store and notices any that vanish (invariant 3 between
    the rounds' surveys: a copy may be published and deleted within one round)."""

    def __init__(self, eyes: Eyes, guard: Guard, problems: list[str]) -> None:
        super().__init__(daemon=True)
        self.eyes = eyes
        self.guard = guard
        self.problems = problems
        self.stop = threading.Event()
        self.seen: set[str] = set()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                images = self.eyes.store_images(Survey())
            except OSError:
                continue
            now = {i.id for i in images if i.published}
            self.guard.note(images)
            for iid in self.seen - now:
                why = self.guard.gone(STORE, iid)
                if why is not None:
                    self.problems.append(why + " (seen by the store watcher)")
            self.seen = now
