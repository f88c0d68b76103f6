"""Persistent state under ``state_dir``: per-(image, site) locks, leases, history, answers.

- Locks are ``flock`` files (``locks/``): the kernel releases them when a process dies, so a
  crash never leaves a stale lock. Two ``push`` runs for one image and site cannot both copy.
- Leases (sqlite ``leases``) record what is being written where, so that a restarted daemon
  can remove what a crash left half-made (a lease whose (name, site) lock nobody holds belongs
  to a dead process), and so that "in flight" can be answered without asking the sites.
- History (``transfers``) and the last known answer per (name, site) (``cells``), which
  ``check`` serves quickly without asking the sites.
- What imagesync made (``made``: every copy it published, by site and id), the only images
  retention may hide or delete; and when it first saw each version (``versions_seen``, by
  origin, its own clock), which orders versions without trusting the sites' clocks.

Modes are explicit whatever the umask: the state directory and ``locks/`` ``0750``, the
database and lock files ``0640`` (sqlite gives its ``-wal`` and ``-shm`` files the database's
mode). A lock file that cannot be opened (one a root-run ``push`` left behind, say) is
``LockDenied`` for that (name, site) alone, naming the path and the fix; a lock file that can
be read but not written (a root-owned ``0644`` one from an older imagesync) is still locked.

One connection is shared by the daemon's transfer threads; a lock serialises its use. The
cells of a whole pass are written in one transaction: an idle pass over thousands of names
must not pay one commit per (name, site).

A state directory this user cannot use (a root-owned ``0750`` one, for a command run by
another account) is a ``StateDirError`` when ``State`` opens it: one line naming the path, its
owner and the fix (run as that user: ``sudo -u OWNER imagesync …``), never a traceback.

``read_cell`` is ``check``'s way in: it opens the database read-only and writes nothing (no
WAL switch, no ``CREATE TABLE``, no ``-wal``/``-shm`` files), so a scheduler account that may
only read ``state_dir`` can answer from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from imagesync.errors import LockBusy, LockDenied, StateDirError

DIR_MODE = 0o750
FILE_MODE = 0o640

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
CREATE TABLE IF NOT EXISTS versions_seen (
  origin TEXT PRIMARY KEY, first_seen REAL NOT NULL
);
"""
#: made apart: when it is new, the copies history already records are imagesync's too
MADE_SCHEMA = """
CREATE TABLE made (
  site TEXT NOT NULL, image_id TEXT NOT NULL, name TEXT NOT NULL, made REAL NOT NULL,
  PRIMARY KEY (site, image_id)
);
INSERT OR IGNORE INTO made (site, image_id, name, made)
  SELECT target, image_id, name, COALESCE(finished, started) FROM transfers
  WHERE result = 'ok' AND image_id IS NOT NULL;
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


def _make_dir(path: Path, *, parents: bool = False) -> None:
    """Create ``path`` with DIR_MODE whatever the umask (an existing one is left as it is)."""
    if path.is_dir():
        return
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)
    _give_path_to_dir_owner(path)


def _give_path_to_dir_owner(path: Path) -> None:
    """Run as root in a state directory the service user owns, give what root just made
    (``locks/``, ``instance-id``) to that user: otherwise one ``push`` by an administrator
    locks the service out of its own state."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        st = os.stat(path.parent)
        if st.st_uid != 0 or st.st_gid != 0:
            os.chown(path, st.st_uid, st.st_gid)


def _make_file(path: Path) -> None:
    """Create ``path`` empty with FILE_MODE whatever the umask, unless it exists."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
        _give_to_dir_owner(fd, path.parent)
    finally:
        os.close(fd)


def _open_lock(path: Path, name: str, site: str) -> tuple[int, bool]:
    """Open (creating it if needed) the lock file; return its fd and whether it is writable.

    Raises LockDenied, naming the path and the fix, when it cannot be opened at all."""
    error: OSError | None = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        error = exc  # the directory may refuse a new file and still hold an old one
    else:
        try:
            os.fchmod(fd, FILE_MODE)
            _give_to_dir_owner(fd, path.parent)
        except BaseException:
            os.close(fd)
            raise
        return fd, True
    for flags, writable in ((os.O_RDWR, True), (os.O_RDONLY, False)):
        # flock needs no write access: a lock file another user owns but lets us read still
        # excludes (only the note of who holds it is not written).
        try:
            return os.open(path, flags | os.O_CLOEXEC), writable
        except FileNotFoundError as exc:
            error = error or exc
            break
        except OSError as exc:
            error = exc if writable else error
    assert error is not None
    raise _denied(path, name, site, error) from error


def _give_to_dir_owner(fd: int, directory: Path) -> None:
    """Run as root (a ``push`` by an administrator), give a new lock file to the owner of
    the lock directory, so that the service user can still take the lock (sqlite does the
    same for its journal files)."""
    if os.geteuid() != 0:
        return
    st = os.stat(directory)
    if st.st_uid != 0 or st.st_gid != 0:
        with contextlib.suppress(OSError):
            os.fchown(fd, st.st_uid, st.st_gid)


def _denied(path: Path, name: str, site: str, exc: OSError) -> LockDenied:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = (
            f"it was made by another user (a push run as root?): give {path.parent} and its "
            "files to the user imagesync runs as (chown -R), and run commands as that user"
        )
    else:
        fix = f"check the state directory {path.parent.parent}"
    return LockDenied(
        f"{name} on {site}: cannot open the lock file {path}: {why}; {fix}", path=str(path)
    )


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
    try:
        if not db.is_file():
            return None
    except PermissionError as exc:  # a folder this account may not search
        raise _state_dir_error(
            Path(state_dir), Path(state_dir), "permission denied", read=True
        ) from exc
    if not os.access(db, os.R_OK):
        raise _state_dir_error(Path(state_dir), db, "permission denied", read=True)
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


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _owner(path: Path) -> int | None:
    """The owner of ``path``, or of its nearest parent that exists (stat needs no rights on
    the object itself, only to search its parents)."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return p.stat().st_uid
    return None


#: sqlite's messages for a database or folder this user may not write (it has no errno)
_SQLITE_DENIED = ("readonly database", "unable to open database", "disk i/o error")


def _state_dir_error(state_dir: Path, path: Path, why: str, *, read: bool = False) -> StateDirError:
    """One line: what cannot be used, by whom, and the ways to fix it. ``read``: only
    reading was wanted (``check`` from recorded state, by a scheduler account)."""
    me = _user(os.geteuid())
    owner_uid = _owner(state_dir)
    owner = _user(owner_uid) if owner_uid is not None else None
    where = "" if path == state_dir else f" ({path})"
    if read:
        fix = (
            f"let {me} read it (a group that may read {state_dir} and its imagesync.sqlite), "
            f"or run as {owner or 'the service user'}"
        )
    elif owner is not None and owner_uid != os.geteuid():
        fix = (
            f"it belongs to {owner}: run imagesync as that user (sudo -u {owner} imagesync …), "
            f"or set state_dir to a folder {me} may write"
        )
    else:
        fix = f"give it to {me} (chown -R {me}: {state_dir}) or set state_dir elsewhere"
    verb = "read" if read else "use"
    return StateDirError(
        f"cannot {verb} the state directory {state_dir}{where} as user {me}: {why}; {fix}",
        path=str(path),
    )


def _usable(state_dir: Path, db_path: Path) -> None:
    """Raise StateDirError unless this user may write the folder and the database (sqlite
    would open an unwritable database read-only without a word and fail at the first write)."""
    for path, what in ((state_dir, os.W_OK | os.X_OK), (db_path, os.R_OK | os.W_OK)):
        if path.exists() and not os.access(path, what):
            raise _state_dir_error(state_dir, path, "permission denied")


class State:
    """The sqlite database and lock directory under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.db_path = self.dir / "imagesync.sqlite"
        try:
            self._open()
        except PermissionError as exc:
            path = Path(exc.filename) if exc.filename else self.dir
            raise _state_dir_error(self.dir, path, exc.strerror or str(exc)) from exc
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            path = Path(exc.filename) if exc.filename else self.dir
            raise _state_dir_error(self.dir, path, exc.strerror or str(exc)) from exc
        except sqlite3.OperationalError as exc:
            if not any(s in str(exc).lower() for s in _SQLITE_DENIED):
                raise
            raise _state_dir_error(self.dir, self.db_path, str(exc)) from exc

    def _open(self) -> None:
        _make_dir(self.dir, parents=True)
        _usable(self.dir, self.db_path)
        _make_dir(self.dir / "locks")
        _make_file(self.db_path)  # so that sqlite opens a file with our mode, not the umask's
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
        self._create_made()

    def _create_made(self) -> None:
        """The ``made`` table, filled from history the first time (a state database from
        before it existed keeps retiring the copies its history records)."""
        query = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='made'"
        with self._mutex:
            if self._db.execute(query).fetchone():
                return  # the usual case: no write
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if not self._db.execute(query).fetchone():  # another process may have won
                    for statement in MADE_SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._mutex:
            self._db.close()

    @property
    def instance_id(self) -> str:
        """This imagesync's stable identity (a uuid kept in ``state_dir/instance-id``), which
        upload markers name: processes sharing a state dir are one instance (their locks and
        leases are shared); another state dir is another instance. Made on first use, so
        opening the state for reading writes nothing."""
        path = self.dir / "instance-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        candidate = str(uuid.uuid4())
        # Written whole under a temporary name, then linked into place: link() fails when the
        # name exists, so of two processes racing here both end up with the winner's id, and
        # none ever reads a half-written file.
        tmp = self.dir / f".instance-id.{candidate}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        _give_path_to_dir_owner(tmp)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(candidate + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return path.read_text().strip()
        finally:
            tmp.unlink(missing_ok=True)
        return candidate

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        with self._mutex:
            return self._db.execute(sql, tuple(args)).fetchall()

    # -- locks -----------------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str, site: str, *, wait: float = 0.0) -> Iterator[None]:
        """Hold the (name, site) lock; raise LockBusy if another process holds it."""
        path = self.dir / "locks" / _key(name, site)
        fd, writable = _open_lock(path, name, site)
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
            if writable:  # who holds it, for a curious operator (nothing reads it back)
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

    # -- what imagesync made, and when it first saw each version ---------------------------
    def record_made(self, site: str, image_id: str, name: str, when: float | None = None) -> None:
        """imagesync made this copy (recorded when its upload begins): once it is published,
        retention may retire it one day."""
        self._exec(
            "INSERT OR IGNORE INTO made VALUES (?,?,?,?)",
            (site, image_id, name, time.time() if when is None else when),
        )

    def made(self) -> dict[str, frozenset[str]]:
        """Per site, the ids of the copies imagesync recorded publishing there."""
        out: dict[str, set[str]] = {}
        for site, image_id in self._exec("SELECT site, image_id FROM made"):
            out.setdefault(site, set()).add(image_id)
        return {site: frozenset(ids) for site, ids in out.items()}

    def first_seen(self, origins: Iterable[str], now: float) -> dict[str, float]:
        """When imagesync first saw each version (by origin); those never seen are seen
        ``now``. One write transaction, and only when something is new."""
        wanted = set(origins)
        if not wanted:
            return {}
        known: dict[str, float] = dict(self._exec("SELECT origin, first_seen FROM versions_seen"))
        new = [(o, now) for o in wanted if o not in known]
        if new:
            with self._mutex:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    # OR IGNORE: another process may have seen it first; its time stands
                    self._db.executemany("INSERT OR IGNORE INTO versions_seen VALUES (?,?)", new)
                    rows = self._db.execute("SELECT origin, first_seen FROM versions_seen")
                    known = dict(rows.fetchall())
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        return {o: known[o] for o in wanted if o in known}

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
