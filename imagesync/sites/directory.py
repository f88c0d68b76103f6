"""A directory store (local disk or NFS): the embedded default and the simplest Site.

Layout: ``ROOT/<name>/<id>.img`` holds the bytes, ``ROOT/<name>/<id>.json`` the metadata.
An upload writes ``.<id>.img.partial`` and only renames it into place after every byte is on
disk (fsync) and verified; metadata is written to a temp file and renamed, so a reader never
sees half a file. Names that could escape the folder are rejected.

It can hide images (a ``hidden`` flag in the metadata); it cannot list changes since a
watermark. No server boots from it, so none of its images is ever in use. Every ``OSError``
becomes a ``SiteError`` here; an id that is not there is ``NotFound``, but a store directory
that is gone is a ``SiteError`` (an unreachable store must never look like one whose images
were deleted).

Publishing is crash-atomic (see ``_publish``): its commit point is one rename of the hidden
metadata to the published name, so no crash leaves a published image that also looks like an
upload to crash recovery.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from imagesync.errors import NotFound, SiteError
from imagesync.model import (
    PROP_STATE,
    STATE_UPLOADING,
    ImageRecord,
    NewImage,
    format_time,
    parse_time,
)
from imagesync.sites.base import Capabilities

CHUNK = 1 << 20
HASHES = frozenset({"sha512", "md5"})
_BAD_CHARS = set("/\\\0") | {chr(c) for c in range(32)}


def check_name(name: str) -> str:
    """Return ``name`` if it is safe as one folder name; raise SiteError otherwise."""
    if not name or name in (".", "..") or name.startswith(".") or len(name) > 255:
        raise SiteError(f"unsafe image name {name!r}: empty, dot-leading or too long")
    if any(c in _BAD_CHARS for c in name):
        raise SiteError(
            f"unsafe image name {name!r}: contains '/', '\\\\', NUL or a control character"
        )
    return name


def _check_id(image_id: str) -> str:
    if not image_id or not all(c in "0123456789abcdef-" for c in image_id):
        raise NotFound(f"no image {image_id!r}")
    return image_id


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable: a rename is only on disk once its directory is."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _DirWriter:
    def __init__(self, site: DirectorySite, new: NewImage) -> None:
        self.site = site
        self.new = new
        self._id = str(uuid.uuid4())
        self.folder = site.root / check_name(new.name)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.partial = self.folder / f".{self._id}.img.partial"
        self._f: BinaryIO | None = open(self.partial, "xb")  # noqa: SIM115 - closed in finish
        self.size = 0
        self.sha512 = hashlib.sha512()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.finished = False
        self.created_at = datetime.now(UTC)
        self._write_meta(None)

    def _write_meta(self, hashes: dict[str, str] | None) -> dict[str, Any]:
        props = dict(self.new.properties)
        props[PROP_STATE] = STATE_UPLOADING
        meta = {
            "id": self._id,
            "name": self.new.name,
            "created_at": format_time(self.created_at),
            "size": self.size,
            "hashes": hashes or {},
            "disk_format": self.new.disk_format,
            "container_format": self.new.container_format,
            "min_disk": self.new.min_disk,
            "min_ram": self.new.min_ram,
            "properties": props,
            "visibility": self.new.visibility,
            "status": "active" if hashes is not None else "saving",
        }
        _write_atomic(self.folder / f".{self._id}.json", json.dumps(meta, indent=1).encode())
        return meta

    @property
    def image_id(self) -> str:
        return self._id

    def write(self, chunk: bytes) -> None:
        assert self._f is not None
        try:
            self._f.write(chunk)
        except OSError as exc:
            raise SiteError(f"writing {self.partial}: {exc.strerror}", site=self.site.name) from exc
        self.sha512.update(chunk)
        self.md5.update(chunk)
        self.size += len(chunk)

    def finish(self) -> ImageRecord:
        assert self._f is not None
        try:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            finally:
                self._f.close()
                self._f = None
            # Unpublished: data stays under its partial name; the metadata sits beside it hidden.
            meta = self._write_meta(
                {"sha512": self.sha512.hexdigest(), "md5": self.md5.hexdigest()}
            )
        except OSError as exc:
            raise SiteError(
                f"storing {self.partial}: {exc.strerror or exc}", site=self.site.name
            ) from exc
        self.finished = True
        return self.site._record(meta)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        for p in (self.partial, self.folder / f".{self._id}.json"):
            p.unlink(missing_ok=True)
        self.site._prune(self.folder)


class DirectorySite:
    """A Site over a local or network directory."""

    kind = "directory"

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = Path(root)
        self.capabilities = Capabilities.fill(self, hashes=HASHES)

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Turn an OSError into a SiteError naming what failed (the boundary of this site)."""
        try:
            yield
        except OSError as exc:
            raise SiteError(f"{what}: {exc.strerror or exc}", site=self.name) from exc

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise SiteError(f"store directory {self.root} does not exist", site=self.name)

    def _record(self, meta: dict[str, Any]) -> ImageRecord:
        created = parse_time(meta.get("created_at")) or datetime.now(UTC)
        props = {str(k): str(v) for k, v in (meta.get("properties") or {}).items()}
        return ImageRecord(
            site=self.name,
            id=str(meta["id"]),
            name=str(meta["name"]),
            status=str(meta.get("status") or "active"),
            created_at=created,
            size=int(meta["size"]) if meta.get("size") is not None else None,
            hashes={str(k): str(v) for k, v in (meta.get("hashes") or {}).items()},
            disk_format=meta.get("disk_format"),
            container_format=meta.get("container_format"),
            min_disk=int(meta.get("min_disk") or 0),
            min_ram=int(meta.get("min_ram") or 0),
            properties=props,
            visibility=str(meta.get("visibility") or "private"),
            hidden=bool(meta.get("hidden", False)),
        )

    def _load(self, folder: Path, image_id: str) -> ImageRecord | None:
        meta_path = folder / f"{image_id}.json"
        data_path = folder / f"{image_id}.img"
        try:
            meta = json.loads(meta_path.read_bytes())
        except (OSError, ValueError):
            return None
        if not data_path.exists():
            return None
        return self._record(meta)

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        with self._io(f"listing {self.root}"):
            return self._list_images(name)

    def _list_images(self, name: str | None) -> list[ImageRecord]:
        self._require_root()
        folders = [self.root / check_name(name)] if name else sorted(self.root.iterdir())
        out: list[ImageRecord] = []
        for folder in folders:
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            for meta_path in sorted(folder.glob("*.json")):
                if meta_path.name.startswith("."):
                    if meta_path.name.endswith(".tmp"):
                        continue
                    if (folder / meta_path.name[1:]).exists():
                        continue  # published: a stale hidden meta an older version left
                    try:  # an unpublished upload: report it so crash recovery can find it
                        meta = json.loads(meta_path.read_bytes())
                        out.append(self._unpublished(meta))
                    except (OSError, ValueError, KeyError):
                        continue
                    continue
                rec = self._load(folder, meta_path.stem)
                if rec is not None:
                    out.append(rec)
        return out

    def _find(self, image_id: str) -> tuple[Path, bool]:
        """The folder holding ``image_id`` and whether it is published.

        An id whose ``{id}.json`` exists is published, whatever else is beside it. Publishing
        renames ``.{id}.json`` to ``{id}.json``, so at every instant one of them exists: the
        published name is asked for again after the hidden one, lest a publish between the
        two looks make the image seem missing."""
        _check_id(image_id)
        self._require_root()
        with self._io(f"looking for image {image_id} in {self.root}"):
            for folder in self.root.iterdir():
                if (folder / f"{image_id}.json").exists():
                    return folder, True
                if (folder / f".{image_id}.json").exists():
                    return folder, False
                if (folder / f"{image_id}.json").exists():
                    return folder, True
        raise NotFound(f"no image {image_id}", site=self.name)

    def _unpublished(self, meta: dict[str, Any]) -> ImageRecord:
        """An upload's record: hidden and marked as uploading, whatever its metadata says
        (until the rename that publishes it, it is not published; see ``_publish``)."""
        rec = self._record(meta)
        return rec.with_(hidden=True, properties={**rec.properties, PROP_STATE: STATE_UPLOADING})

    def get_image(self, image_id: str) -> ImageRecord:
        folder, published = self._find(image_id)
        if not published:
            try:
                meta = json.loads((folder / f".{image_id}.json").read_bytes())
            except FileNotFoundError:
                return self.get_image(image_id)  # published (or deleted) since _find: look again
            except OSError as exc:
                raise SiteError(
                    f"reading image {image_id}: {exc.strerror or exc}", site=self.name
                ) from exc
            return self._unpublished(meta)
        rec = self._load(folder, image_id)
        if rec is None:
            raise NotFound(f"no image {image_id}", site=self.name)
        return rec

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        folder, _ = self._find(image.id)
        path = folder / f"{image.id}.img"
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except OSError as exc:
            raise NotFound(f"cannot open {path}: {exc.strerror}", site=self.name) from exc
        return self._chunks(f, offset)

    @staticmethod
    def _chunks(f: BinaryIO, offset: int) -> Iterator[bytes]:
        with f:
            if offset:
                f.seek(offset)
            while chunk := f.read(CHUNK):
                yield chunk

    def create(self, new: NewImage) -> _DirWriter:
        self._require_root()
        with self._io(f"creating image {new.name!r} in {self.root}"):
            return _DirWriter(self, new)

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        folder, published = self._find(image_id)
        if published:
            with self._io(f"publishing image {image_id}"):
                # an older version's interrupted publish may have left the hidden meta
                (folder / f".{image_id}.json").unlink(missing_ok=True)
            return self.get_image(image_id)
        with self._io(f"publishing image {image_id}"):
            return self._publish(folder, image_id, properties)

    def _publish(
        self, folder: Path, image_id: str, properties: Mapping[str, str] | None
    ) -> ImageRecord:
        """Crash-atomic: a ``kill -9`` (or power cut) at any step leaves either an upload
        (the hidden meta, which recovery removes whole) or the published image, never a
        published image that also looks like an upload. The steps:

        1. the final metadata replaces the hidden meta's content (still hidden: an image
           without ``{id}.json`` is an upload whatever its hidden meta says);
        2. the data is renamed into place (``{id}.img``; still an upload, see 1);
        3. the hidden meta is renamed to ``{id}.json``: the commit point, one rename, after
           which no hidden meta is left;
        the directory is fsynced after 2 (so that 3 never reaches the disk before it) and
        after 3 (so that a published image stays published).
        """
        hidden_meta = folder / f".{image_id}.json"
        meta = json.loads(hidden_meta.read_bytes())
        meta["properties"].pop(PROP_STATE, None)
        meta["status"] = "active"
        meta["properties"].update(properties or {})
        _write_atomic(hidden_meta, json.dumps(meta, indent=1).encode())
        os.replace(folder / f".{image_id}.img.partial", folder / f"{image_id}.img")
        _fsync_dir(folder)
        os.replace(hidden_meta, folder / f"{image_id}.json")
        _fsync_dir(folder)
        return self._record(meta)

    def delete(self, image_id: str) -> None:
        try:
            folder, _ = self._find(image_id)
        except NotFound:
            return
        with self._io(f"deleting image {image_id}"):
            for p in (
                f"{image_id}.json",
                f".{image_id}.json",
                f"{image_id}.img",
                f".{image_id}.img.partial",
            ):
                (folder / p).unlink(missing_ok=True)
            for tmp in folder.glob(f".*{image_id}*.tmp"):  # a crash inside _write_atomic
                tmp.unlink(missing_ok=True)
        self._prune(folder)

    def hide(self, image_id: str) -> None:
        folder, _ = self._find(image_id)
        meta_path = folder / f"{image_id}.json"
        with self._io(f"hiding image {image_id}"):
            meta = json.loads(meta_path.read_bytes())
            meta["hidden"] = True
            _write_atomic(meta_path, json.dumps(meta, indent=1).encode())

    def images_in_use(self) -> set[str]:
        """Empty: no server boots from a store, so ``retire: delete`` may delete here."""
        return set()

    def check_connection(self) -> str:
        """Is the store directory there and writable (a file is made and removed to know)?"""
        path = self.root
        if not path.exists():
            raise SiteError(f"{path} does not exist: create it (mkdir -p {path})", site=self.name)
        if not path.is_dir():
            raise SiteError(f"{path} is not a directory", site=self.name)
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".imagesync-check-"):
                pass
        except OSError as exc:
            raise SiteError(
                f"{path} is not writable: {exc.strerror or exc}", site=self.name
            ) from exc
        return f"writable directory {path}"

    def close(self) -> None:
        pass

    def _prune(self, folder: Path) -> None:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty
