"""Persistent state under ``state_dir``: per-(image, site) locks, leases, history, answers.

- Locks are ``flock`` files (``locks/``): the kernel releases them when a process dies, so a
  crash never leaves a stale lock. Two ``push`` runs for one image and site cannot both copy.
- Leases (sqlite ``leases``) record what is being written where, so that a restarted daemon
  can remove what a crash left half-made (a lease whose (name, site) lock nobody holds belongs
  to a dead process), and so that "in flight" can be answered without asking the sites.
- History (``transfers``) and the last known answer per (name, site) (``cells``), which
  ``check`` serves quickly without asking the sites.

One connection is shared by the daemon's transfer threads; a lock serialises its use. The
cells of a whole pass are written in one transaction: an idle pass over thousands of names
must not pay one commit per (name, site).

``read_cell`` is ``check``'s way in: it opens the database read-only and writes nothing (no
WAL switch, no ``CREATE TABLE``, no ``-wal``/``-shm`` files), so a scheduler account that may
only read ``state_dir`` can answer from it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from imagesync.errors import LockBusy

SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  started REAL NOT NULL, finished REAL, name TEXT NOT NULL, source TEXT NOT NULL,
  target TEXT NOT NULL, version TEXT, sha512 TEXT, bytes INTEGER, seconds REAL,
  result TEXT NOT NULL, image_id TEXT, error TEXT
);
CREATE INDEX IF NOT EXISTS transfers_name ON transfers(name, started);
CREATE TABLE IF NOT EXISTS cells (
  name TEXT NOT NULL, site TEXT NOT NULL, state TEXT NOT NULL, image_id TEXT,
  version TEXT, newest TEXT, sha512 TEXT, recorded REAL NOT NULL,
  PRIMARY KEY (name, site)
);
CREATE TABLE IF NOT EXISTS leases (
  site TEXT NOT NULL, image_id TEXT NOT NULL, name TEXT NOT NULL, pid INTEGER NOT NULL,
  started REAL NOT NULL, PRIMARY KEY (site, image_id)
);
"""


@dataclass(frozen=True)
class RecordedCell:
    name: str
    site: str
    state: str
    image_id: str | None
    version: str | None
    newest: str | None
    sha512: str | None
    recorded: float


@dataclass(frozen=True)
class Lease:
    site: str
    image_id: str
    name: str
    pid: int
    started: float


def _read_only_uri(db: Path, *, immutable: bool) -> str:
    # quote() keeps "/" and escapes "?", "#" and "%", which would end or change a URI path
    uri = f"file:{quote(str(db.absolute()))}?mode=ro"
    return uri + "&immutable=1" if immutable else uri


def read_cell(state_dir: Path, name: str, site: str) -> RecordedCell | None:
    """The recorded answer for (name, site), read without writing anything; None when there
    is no database, no such row, or the database cannot be read.

    ``mode=ro`` alone is not enough for a WAL database: with no ``-wal``/``-shm`` beside it,
    SQLite creates them (which fails in a directory the caller may not write to, and, run
    as root, leaves root-owned files that lock the service user out of its own database).
    So ``mode=ro`` is used only while both exist (a writer has the database open: its
    ``-shm`` tells us which commits to see); otherwise nobody has it open and its main file
    holds every commit, read with ``immutable=1`` (no locks, no files). A writer that opens
    it between the two steps only appends to its new ``-wal``; should a checkpoint tear a
    page under us, the error below makes this "no recorded answer", never a wrong one.
    """
    db = Path(state_dir) / "imagesync.sqlite"
    if not db.is_file():
        return None
    live = Path(f"{db}-wal").exists() and Path(f"{db}-shm").exists()
    attempts = (False, True) if live else (True,)
    for immutable in attempts:
        try:
            conn = sqlite3.connect(_read_only_uri(db, immutable=immutable), uri=True, timeout=5)
        except sqlite3.Error:
            continue
        try:
            rows = conn.execute(
                "SELECT * FROM cells WHERE name=? AND site=?", (name, site)
            ).fetchall()
            return RecordedCell(*rows[0]) if rows else None
        except sqlite3.Error:
            continue  # e.g. a -shm we may not write needing recovery: try the main file
        finally:
            conn.close()
    return None


def _key(name: str, site: str) -> str:
    digest = hashlib.sha256(f"{name}\0{site}".encode()).hexdigest()[:24]
    return f"{digest}.lock"


class State:
    """The sqlite database and lock directory under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "locks").mkdir(exist_ok=True)
        self.db_path = self.dir / "imagesync.sqlite"
        self._db = sqlite3.connect(
            self.db_path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self._mutex = threading.RLock()
        self._db.execute("PRAGMA busy_timeout=30000")
        # Switching to WAL (and recovering a WAL another process left) can answer "database
        # is locked" at once, without the busy handler, while another process opens the
        # same database: try again for a while (seen when a daemon and a command start).
        for attempt in range(100):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)
        # With WAL, NORMAL never corrupts the database; a power cut may lose the last commits,
        # which the next pass recomputes.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._mutex:
            self._db.close()

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        with self._mutex:
            return self._db.execute(sql, tuple(args)).fetchall()

    # -- locks -----------------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str, site: str, *, wait: float = 0.0) -> Iterator[None]:
        """Hold the (name, site) lock; raise LockBusy if another process holds it."""
        path = self.dir / "locks" / _key(name, site)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockBusy(
                            f"{name} on {site}: another imagesync is copying it now"
                        ) from None
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "name": name, "site": site}).encode())
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # -- leases ----------------------------------------------------------------------------
    def add_lease(self, site: str, image_id: str, name: str) -> None:
        self._exec(
            "INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?)",
            (site, image_id, name, os.getpid(), time.time()),
        )

    def drop_lease(self, site: str, image_id: str) -> None:
        self._exec("DELETE FROM leases WHERE site=? AND image_id=?", (site, image_id))

    def leases(self, pid: int | None = None) -> list[Lease]:
        """Every lease, or those of process ``pid``."""
        q = "SELECT site, image_id, name, pid, started FROM leases"
        if pid is not None:
            return [Lease(*r) for r in self._exec(q + " WHERE pid=?", (pid,))]
        return [Lease(*r) for r in self._exec(q)]

    # -- history -----------------------------------------------------------------------------
    def record_transfer(self, **row: Any) -> None:
        cols = (
            "started",
            "finished",
            "name",
            "source",
            "target",
            "version",
            "sha512",
            "bytes",
            "seconds",
            "result",
            "image_id",
            "error",
        )
        self._exec(
            f"INSERT INTO transfers ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
            tuple(row.get(c) for c in cols),
        )

    def history(self, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        q = "SELECT * FROM transfers"
        args: tuple[Any, ...] = ()
        if name:
            q += " WHERE name=?"
            args = (name,)
        q += " ORDER BY id DESC LIMIT ?"
        with self._mutex:
            cur = self._db.execute(q, (*args, limit))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # -- recorded answers ----------------------------------------------------------------------
    def record_cells(self, cells: Iterable[RecordedCell]) -> None:
        """Write many answers in one transaction."""
        rows = [
            (c.name, c.site, c.state, c.image_id, c.version, c.newest, c.sha512, c.recorded)
            for c in cells
        ]
        if not rows:
            return
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO cells VALUES (?,?,?,?,?,?,?,?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def cell(self, name: str, site: str) -> RecordedCell | None:
        rows = self._exec("SELECT * FROM cells WHERE name=? AND site=?", (name, site))
        return RecordedCell(*rows[0]) if rows else None

    def cells(self, name: str | None = None) -> list[RecordedCell]:
        if name:
            rows = self._exec("SELECT * FROM cells WHERE name=?", (name,))
        else:
            rows = self._exec("SELECT * FROM cells")
        return [RecordedCell(*r) for r in rows]
