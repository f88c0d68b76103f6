"""Where the lab VOSpace service keeps its nodes: sqlite for the tree, one file per data node.

The tree (type, properties, length, md5, dates) lives in ``ROOT/nodes.sqlite``, so that
listings page by name (``limit`` + ``uri``) with an index instead of a directory scan, and a
node's bytes live in ``ROOT/blobs/<id>``. A data upload streams into a new blob and is swapped
in by one transaction only once complete and verified: a reader never sees half a file, and a
rejected upload (412) leaves the node as it was. uwsgi may run several workers: every call opens
its own connection and sqlite's locking keeps them apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from imagesync.lab.vospace import xmldoc

PAGE = 500  # children read from sqlite per query while a listing streams


class StoreError(Exception):
    """A VOSpace fault: ``status`` is the HTTP answer, the message starts with the fault name."""

    status = 400

    def __init__(self, fault: str, detail: str) -> None:
        super().__init__(f"{fault} {detail}")


class NotFound(StoreError):
    status = 404


class Exists(StoreError):
    status = 409


class Invalid(StoreError):
    status = 400


def vos_date(ts: float) -> str:
    """``YYYY-MM-DDThh:mm:ss.sssZ``: the one form CADC's client parses (``+00:00`` crashes it)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def normalize(path: str) -> str:
    """A node path without leading or trailing slashes ("" is the root); rejects ``..``."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise Invalid("InvalidURI", f"{path!r}: '.' and '..' are not node names")
    return "/".join(parts)


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


@dataclass
class Node:
    path: str
    type: str  # ContainerNode | DataNode | LinkNode
    props: dict[str, str] = field(default_factory=dict)
    blob: str | None = None
    length: int = 0
    md5: str | None = None  # hex
    mtime: float = 0.0
    ctime: float = 0.0
    target: str | None = None

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    def properties(self) -> dict[str, str]:
        """The custom properties plus the ones the service computes."""
        props = dict(self.props)
        props[xmldoc.PROP_DATE] = vos_date(self.mtime)
        props[xmldoc.PROP_CTIME] = vos_date(self.ctime)
        if self.type == "DataNode":
            props[xmldoc.PROP_LENGTH] = str(self.length)
            if self.md5:
                props[xmldoc.PROP_MD5] = self.md5
        return props


_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    path TEXT PRIMARY KEY, parent TEXT NOT NULL, type TEXT NOT NULL, props TEXT NOT NULL,
    blob TEXT, length INTEGER NOT NULL DEFAULT 0, md5 TEXT, mtime REAL NOT NULL,
    ctime REAL NOT NULL, target TEXT
);
CREATE INDEX IF NOT EXISTS nodes_parent ON nodes (parent, path);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, target TEXT NOT NULL, direction TEXT NOT NULL, protocols TEXT NOT NULL,
    phase TEXT NOT NULL, error TEXT, keep_bytes INTEGER NOT NULL DEFAULT 1
);
"""

_COLUMNS = "path, type, props, blob, length, md5, mtime, ctime, target"


def _row(row: tuple[object, ...]) -> Node:
    path, type_, props, blob, length, md5, mtime, ctime, target = row
    return Node(
        path=str(path),
        type=str(type_),
        props=json.loads(str(props)),
        blob=None if blob is None else str(blob),
        length=int(length),  # type: ignore[call-overload]
        md5=None if md5 is None else str(md5),
        mtime=float(mtime),  # type: ignore[arg-type]
        ctime=float(ctime),  # type: ignore[arg-type]
        target=None if target is None else str(target),
    )


@dataclass(frozen=True)
class Job:
    id: str
    target: str
    direction: str
    protocols: tuple[str, ...]
    phase: str
    error: str | None
    keep_bytes: bool


class Store:
    """The node tree under ``root`` (created with its root container on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.db = root / "nodes.sqlite"
        with contextlib.closing(sqlite3.connect(self.db, timeout=30.0)) as db:
            db.executescript(_SCHEMA)  # commits on its own: not inside _tx
        with self._tx() as db:
            now = time.time()
            db.execute(
                "INSERT OR IGNORE INTO nodes (path, parent, type, props, mtime, ctime) "
                "VALUES ('', '', 'ContainerNode', '{}', ?, ?)",
                (now, now),
            )

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # ---- reading

    def get(self, path: str) -> Node | None:
        with self._tx() as db:
            return self._get(db, path)

    @staticmethod
    def _get(db: sqlite3.Connection, path: str) -> Node | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM nodes WHERE path = ?", (path,)).fetchone()
        return None if row is None else _row(row)

    @classmethod
    def _existing(cls, db: sqlite3.Connection, path: str) -> Node:
        node = cls._get(db, path)
        if node is None:
            raise NotFound("NodeNotFound", f"/{path}")
        return node

    def require(self, path: str) -> Node:
        node = self.get(path)
        if node is None:
            raise NotFound("NodeNotFound", f"/{path}")
        return node

    def children(self, path: str, start: str | None, limit: int | None) -> Iterator[Node]:
        """The children of ``path`` by name from ``start`` (inclusive), at most ``limit``."""
        after: str | None = None
        first = f"{path}/{start}" if path and start else start or ""
        left = limit
        while left is None or left > 0:
            page = PAGE if left is None else min(PAGE, left)
            with self._tx() as db:
                if after is None:
                    rows = db.execute(
                        f"SELECT {_COLUMNS} FROM nodes WHERE parent = ? AND path != '' "
                        "AND path >= ? ORDER BY path LIMIT ?",
                        (path, first, page),
                    ).fetchall()
                else:
                    rows = db.execute(
                        f"SELECT {_COLUMNS} FROM nodes WHERE parent = ? AND path != '' "
                        "AND path > ? ORDER BY path LIMIT ?",
                        (path, after, page),
                    ).fetchall()
            for row in rows:
                yield _row(row)
            if len(rows) < page:
                return
            after = str(rows[-1][0])
            if left is not None:
                left -= len(rows)

    def blob_path(self, node: Node) -> Path | None:
        return None if node.blob is None else self.blobs / node.blob

    # ---- writing

    def create(
        self, path: str, type_: str, props: dict[str, str], target: str | None = None
    ) -> Node:
        if not path:
            raise Exists("DuplicateNode", "/")
        now = time.time()
        with self._tx() as db:
            if self._get(db, path) is not None:
                raise Exists("DuplicateNode", f"/{path}")
            self._container(db, parent_of(path))
            db.execute(
                "INSERT INTO nodes (path, parent, type, props, mtime, ctime, target) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (path, parent_of(path), type_, json.dumps(_mutable(props)), now, now, target),
            )
            node = self._get(db, path)
        assert node is not None
        return node

    @staticmethod
    def _container(db: sqlite3.Connection, path: str) -> None:
        row = db.execute("SELECT type FROM nodes WHERE path = ?", (path,)).fetchone()
        if row is None:
            raise NotFound("ContainerNotFound", f"/{path}")
        if row[0] != "ContainerNode":
            raise Invalid("ContainerNotFound", f"/{path} is not a container")

    def set_properties(self, path: str, props: dict[str, str], deleted: set[str]) -> Node:
        with self._tx() as db:
            node = self._existing(db, path)
            merged = dict(node.props)
            merged.update(_mutable(props))
            for uri in deleted:
                merged.pop(uri, None)
            db.execute("UPDATE nodes SET props = ? WHERE path = ?", (json.dumps(merged), path))
            node.props = merged
        return node

    def delete(self, path: str) -> None:
        if not path:
            raise Invalid("PermissionDenied", "the root container cannot be deleted")
        with self._tx() as db:
            node = self._existing(db, path)
            if (
                node.type == "ContainerNode"
                and db.execute("SELECT 1 FROM nodes WHERE parent = ? LIMIT 1", (path,)).fetchone()
            ):
                # what CADC's vault answers (no recursive delete offered)
                raise Invalid("ContainerNotEmpty", f"/{path}")
            db.execute("DELETE FROM nodes WHERE path = ?", (path,))
        if node.blob:
            with contextlib.suppress(FileNotFoundError):
                (self.blobs / node.blob).unlink()

    def new_blob(self) -> tuple[str, Path]:
        """A fresh blob file name and path to stream an upload into."""
        name = uuid.uuid4().hex
        return name, self.blobs / f".{name}.part"

    def commit_data(self, path: str, blob: str, part: Path, length: int, md5: str) -> Node:
        """Make the finished upload in ``part`` the bytes of data node ``path``.

        Creates the data node if it does not exist (its parent must).
        """
        os.replace(part, self.blobs / blob)
        now = time.time()
        old: str | None = None
        try:
            with self._tx() as db:
                node = self._get(db, path)
                if node is None:
                    self._container(db, parent_of(path))
                    db.execute(
                        "INSERT INTO nodes (path, parent, type, props, mtime, ctime) "
                        "VALUES (?, ?, 'DataNode', '{}', ?, ?)",
                        (path, parent_of(path), now, now),
                    )
                elif node.type != "DataNode":
                    raise Invalid("InvalidArgument", f"/{path} is a {node.type}, not a DataNode")
                else:
                    old = node.blob
                db.execute(
                    "UPDATE nodes SET blob = ?, length = ?, md5 = ?, mtime = ? WHERE path = ?",
                    (blob, length, md5, now, path),
                )
                committed = self._get(db, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                (self.blobs / blob).unlink()
            raise
        if old:
            with contextlib.suppress(FileNotFoundError):
                (self.blobs / old).unlink()
        assert committed is not None
        return committed

    def check_writable(self, path: str) -> None:
        """Raise unless an upload to ``path`` could be committed (so it fails before reading)."""
        with self._tx() as db:
            node = self._get(db, path)
            if node is None:
                self._container(db, parent_of(path))
            elif node.type != "DataNode":
                raise Invalid("InvalidArgument", f"/{path} is a {node.type}, not a DataNode")

    def move(self, src: str, dest: str) -> Node:
        """Move ``src`` to ``dest`` (into it, if ``dest`` is a container), with its subtree."""
        if not src:
            raise Invalid("PermissionDenied", "the root container cannot be moved")
        with self._tx() as db:
            node = self._existing(db, src)
            existing = self._get(db, dest)
            if existing is not None and existing.type == "ContainerNode":
                dest = f"{dest}/{node.name}" if dest else node.name
                existing = self._get(db, dest)
            if existing is not None:
                raise Exists("DuplicateNode", f"/{dest}")
            if dest == src or dest.startswith(src + "/"):
                raise Invalid("InvalidArgument", f"cannot move /{src} into itself")
            self._container(db, parent_of(dest))
            rows = db.execute(
                "SELECT path FROM nodes WHERE path = ? OR path LIKE ? ESCAPE '\\'",
                (src, _like_prefix(src) + "/%"),
            ).fetchall()
            for (old,) in rows:
                new = dest + str(old)[len(src) :]
                db.execute(
                    "UPDATE nodes SET path = ?, parent = ? WHERE path = ?",
                    (new, parent_of(new), old),
                )
            db.execute("UPDATE nodes SET mtime = ? WHERE path = ?", (time.time(), dest))
            moved = self._get(db, dest)
        assert moved is not None
        return moved

    # ---- transfer jobs

    def new_job(self, transfer: xmldoc.Transfer, target: str, phase: str, error: str | None) -> Job:
        job = Job(
            id=uuid.uuid4().hex,
            target=target,
            direction=transfer.direction,
            protocols=transfer.protocols,
            phase=phase,
            error=error,
            keep_bytes=transfer.keep_bytes,
        )
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, target, direction, protocols, phase, error, keep_bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.target,
                    job.direction,
                    json.dumps(job.protocols),
                    job.phase,
                    job.error,
                    int(job.keep_bytes),
                ),
            )
        return job

    def job(self, job_id: str) -> Job:
        with self._tx() as db:
            row = db.execute(
                "SELECT id, target, direction, protocols, phase, error, keep_bytes FROM jobs "
                "WHERE id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise NotFound("NotFound", f"job {job_id}")
        return Job(
            id=row[0],
            target=row[1],
            direction=row[2],
            protocols=tuple(json.loads(row[3])),
            phase=row[4],
            error=row[5],
            keep_bytes=bool(row[6]),
        )

    def set_phase(self, job_id: str, phase: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET phase = ?, error = ? WHERE id = ?", (phase, error, job_id))


def _mutable(props: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in props.items() if k not in xmldoc.IMMUTABLE}


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
