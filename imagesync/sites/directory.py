"""A directory store (local disk or NFS): the embedded default and the simplest Site.

Layout: ``ROOT/<name>/<id>.img`` holds the bytes, ``ROOT/<name>/<id>.json`` the metadata.
An upload writes ``.<id>.img.partial`` and only renames it into place after every byte is on
disk (fsync) and verified; metadata is written to a temp file and renamed, so a reader never
sees half a file. Names that could escape the folder are rejected, and so are names longer
than ``NAME_MAX`` bytes in UTF-8 (the image name is the folder's name; the files inside are
named by id, so the store adds nothing to it).

The hashes ``finish`` reports are read back from the file after fsync (with the page cache
dropped first where the OS allows it), not computed from the chunks handed in: a disk or an
NFS server that stores other bytes than it was given is caught before the copy is published.

Files are created with explicit modes whatever the umask: images and metadata ``0640``,
folders ``0750`` (the store holds images users may not share; the group is for operators).

It can hide images (a ``hidden`` flag in the metadata); it cannot list changes since a
watermark. No server boots from it, so none of its images is ever in use. Every ``OSError``
becomes a ``SiteError`` here, named after what failed and with a hint of the fix: ``EIO``,
``ESTALE`` and timeouts (a soft NFS mount, a server failing over) are :class:`TransientError`,
worth the shared retry policy; a full disk, a permission or a name the file system refuses are
not. An id that is not there is ``NotFound``, but a store directory that is gone is a
``SiteError`` (an unreachable store must never look like one whose images were deleted). One
malformed ``.json`` metadata file is renamed aside (``<file>.bad-<time>``) and reported by a
``directory.metadata_quarantined`` event: it never fails a listing.

Publishing is crash-atomic (see ``_publish``): its commit point is one rename of the hidden
metadata to the published name, so no crash leaves a published image that also looks like an
upload to crash recovery.

With ``compress: zstd`` the data file holds one zstd frame (``sites/compress.py``), made while
the upload streams in; the metadata says so (``"compress": "zstd"``, and the file's
``"stored_size"``), so the objects written before the setting changed stay readable. Size and
hashes stay those of the uncompressed image: ``finish`` decompresses what the disk holds to
hash it, and reads decompress while streaming (from an offset: from the start, skipping).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from imagesync.errors import NotFound, SiteError
from imagesync.model import (
    ImageRecord,
    NewImage,
    format_time,
    layout_of,
    marked_uploading,
    parse_time,
    unmarked,
)
from imagesync.sites.base import Capabilities, glance_fields
from imagesync.sites.compress import ZSTD, Compressor, decompressed
from imagesync.sites.files import (
    CHUNK,
    create_file,
    fsync_dir,
    hash_file,
    make_dir,
    os_error,
    write_atomic,
)

log = structlog.get_logger("imagesync.directory")

HASHES = frozenset({"sha512", "md5"})
NAME_MAX = 255  # bytes: Linux's limit for one path component on every common file system
_BAD_CHARS = set("/\\\0") | {chr(c) for c in range(32)}

# What a metadata file that is not imagesync's JSON raises when it is read into a record.
_MALFORMED = (ValueError, KeyError, TypeError, AttributeError)


def check_name(name: str) -> str:
    """Return ``name`` if it is safe as one folder name; raise SiteError otherwise."""
    if not name or name in (".", "..") or name.startswith("."):
        raise SiteError(f"unsafe image name {name!r}: empty or dot-leading")
    if any(c in _BAD_CHARS for c in name):
        raise SiteError(
            f"unsafe image name {name!r}: contains '/', '\\\\', NUL or a control character"
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise SiteError(f"unsafe image name {name!r}: not valid UTF-8 text") from None
    if size > NAME_MAX:
        raise SiteError(
            f"image name {name[:40]!r}... is {size} bytes in UTF-8: a directory store takes "
            f"names of at most {NAME_MAX} bytes"
        )
    return name


def _check_id(image_id: str) -> str:
    if not image_id or not all(c in "0123456789abcdef-" for c in image_id):
        raise NotFound(f"no image {image_id!r}")
    return image_id


class _DirWriter:
    def __init__(self, site: DirectorySite, new: NewImage) -> None:
        self.site = site
        self.new = new
        self._id = str(uuid.uuid4())
        self.folder = site.root / check_name(new.name)
        self.partial = self.folder / f".{self._id}.img.partial"
        self.meta_path = self.folder / f".{self._id}.json"
        self._f: BinaryIO | None = None
        self.size = 0
        self.finished = False
        self.created_at = datetime.now(UTC)
        self.compressor = (
            Compressor(new.size, what=f"writing {self.partial}", site=site.name)
            if site.compress == ZSTD
            else None
        )
        #: bytes the data file holds (compressed: less than ``size``), known after finish
        self.stored_size: int | None = None
        make_dir(self.folder)
        try:
            self._f = os.fdopen(create_file(self.partial), "wb")
            self._write_meta(None)
        except BaseException:
            self._discard()  # a marker or data file made before the failure must not stay
            raise

    def _write_meta(self, hashes: dict[str, str] | None) -> dict[str, Any]:
        props = marked_uploading(self.new.properties)
        meta = {
            "id": self._id,
            "name": self.new.name,
            "created_at": format_time(self.created_at),
            "size": self.size,
            "hashes": hashes or {},
            **layout_of(self.new),
            "properties": props,
            "visibility": self.new.visibility,
            "status": "active" if hashes is not None else "saving",
        }
        if self.compressor is not None:
            meta["compress"] = ZSTD
            meta["stored_size"] = self.stored_size
        write_atomic(self.meta_path, json.dumps(meta, indent=1).encode())
        return meta

    @property
    def image_id(self) -> str:
        return self._id

    def write(self, chunk: bytes) -> None:
        if self._f is None:
            raise SiteError(f"writing {self.partial}: the upload is closed", site=self.site.name)
        if self.compressor is not None:
            self.size += len(chunk)
            chunk = self.compressor.compress(chunk)
            if not chunk:
                return  # zstd keeps it until its block is full
        with self.site._io(f"writing {self.partial}"):
            self._f.write(chunk)
        if self.compressor is None:
            self.size += len(chunk)

    def finish(self) -> ImageRecord:
        f, self._f = self._f, None
        if f is None:
            raise SiteError(f"storing {self.partial}: the upload is closed", site=self.site.name)
        with self.site._io(f"storing {self.partial}"):
            try:
                if self.compressor is not None:
                    f.write(self.compressor.flush())
                f.flush()
                os.fsync(f.fileno())
            finally:
                f.close()
            self.stored_size = self.partial.stat().st_size
            # What the disk holds, not what we were handed, is what the copy is judged by.
            self.size, hashes = hash_file(
                self.partial,
                self.site.name,
                compressed_size=self.compressor.size if self.compressor else None,
            )
            # Unpublished: data stays under its partial name; the metadata sits beside it hidden.
            meta = self._write_meta(hashes)
        self.finished = True
        return self.site._record(meta)

    def abort(self) -> None:
        """Remove what this upload made. Never raises: what cannot be removed now stays
        marked as an upload (and leased), and recovery removes it later."""
        try:
            self._discard()
        except OSError as exc:
            log.warning(
                "directory.abort_incomplete",
                site=self.site.name,
                path=str(self.partial),
                error=exc.strerror or str(exc),
            )

    def _discard(self) -> None:
        f, self._f = self._f, None
        failed: OSError | None = None
        if f is not None:
            with contextlib.suppress(OSError):  # a full disk fails the flush: the data goes
                f.close()
        for p in (self.partial, self.meta_path):
            try:
                p.unlink(missing_ok=True)
            except OSError as exc:
                failed = exc
        self.site._prune(self.folder)
        if failed is not None:
            raise failed


class DirectorySite:
    """A Site over a local or network directory."""

    kind = "directory"

    def __init__(self, name: str, root: Path, *, compress: str | None = None) -> None:
        self.name = name
        self.root = Path(root)
        #: how new images are stored (None, or "zstd"); each image's metadata says how it was
        self.compress = compress
        self.capabilities = Capabilities.fill(self, hashes=HASHES)

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Turn an OSError (or metadata that is not imagesync's JSON) into a SiteError naming
        what failed: the boundary of this site."""
        try:
            yield
        except OSError as exc:
            raise os_error(exc, what, self.name) from exc
        except _MALFORMED as exc:
            raise SiteError(f"{what}: malformed metadata ({exc!r})", site=self.name) from exc

    def _require_root(self) -> None:
        with self._io(f"looking at the store directory {self.root}"):
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
            hashes={str(k): str(v) for k, v in (meta.get("hashes") or {}).items()},
            properties=props,
            hidden=bool(meta.get("hidden", False)),
            **glance_fields(meta),
        )

    def _read(self, meta_path: Path) -> ImageRecord:
        """The record in one metadata file. Raises OSError, or one of _MALFORMED."""
        meta = json.loads(meta_path.read_bytes())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        return self._record(meta)

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        with self._io(f"listing {self.root}"):
            return self._list_images(name)

    def _list_images(self, name: str | None) -> list[ImageRecord]:
        self._require_root()
        folders = [self.root / check_name(name)] if name else sorted(self.root.iterdir())
        out: list[ImageRecord] = []
        for folder in folders:
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            for meta_path in sorted(folder.glob("*.json")):
                rec = self._listed(folder, meta_path)
                if rec is not None:
                    out.append(rec)
        return out

    def _listed(self, folder: Path, meta_path: Path) -> ImageRecord | None:
        """One metadata file as the listing shows it, or None. A file that vanished meanwhile
        (published, aborted) is skipped; one that is not imagesync's JSON is quarantined. Any
        other OSError fails the whole listing: a listing either completes or counts as failed."""
        if meta_path.name.startswith(".") and (folder / meta_path.name[1:]).exists():
            return None  # published: a stale hidden meta an older version left
        try:
            rec = self._read(meta_path)
        except FileNotFoundError:
            return None
        except _MALFORMED as exc:
            self._quarantine(meta_path, exc)
            return None
        if meta_path.name.startswith("."):
            # An unpublished upload: reported (hidden) so that crash recovery can find it.
            return self._as_upload(rec)
        if not (folder / f"{meta_path.stem}.img").exists():
            return None
        return rec

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        """Rename a metadata file that cannot be read aside, and say so (never fatal)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = path.with_name(f"{path.name}.bad-{stamp}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # another process listing the store moved it first
        except OSError as err:
            log.error(
                "directory.metadata_unreadable",
                site=self.name,
                path=str(path),
                error=repr(exc),
                rename_error=err.strerror or str(err),
            )
            return
        log.error(
            "directory.metadata_quarantined",
            site=self.name,
            path=str(path),
            moved_to=str(aside),
            error=repr(exc),
        )

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

    @staticmethod
    def _as_upload(rec: ImageRecord) -> ImageRecord:
        """An upload's record: hidden and marked as uploading, whatever its metadata says
        (until the rename that publishes it, it is not published; see ``_publish``)."""
        return rec.with_(hidden=True, properties=marked_uploading(rec.properties))

    def get_image(self, image_id: str) -> ImageRecord:
        folder, published = self._find(image_id)
        if not published:
            meta_path = folder / f".{image_id}.json"
            try:
                with self._io(f"reading {meta_path}"):
                    rec = self._read(meta_path)
            except SiteError as exc:
                if isinstance(exc.__cause__, FileNotFoundError):
                    return self.get_image(image_id)  # published (or deleted) since _find
                raise
            return self._as_upload(rec)
        meta_path = folder / f"{image_id}.json"
        try:
            with self._io(f"reading {meta_path}"):
                rec = self._read(meta_path)
                if not (folder / f"{image_id}.img").exists():
                    raise NotFound(f"no image {image_id}", site=self.name)
        except SiteError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                raise NotFound(f"no image {image_id}", site=self.name) from exc
            raise
        return rec

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        folder, _ = self._find(image.id)
        path = folder / f"{image.id}.img"
        meta_path = folder / f"{image.id}.json"
        try:
            meta = json.loads(meta_path.read_bytes())
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError as exc:
            raise NotFound(f"cannot open {path}: {exc.strerror}", site=self.name) from exc
        except OSError as exc:
            raise os_error(exc, f"opening {path}", self.name) from exc
        except ValueError as exc:
            raise SiteError(
                f"reading {meta_path}: malformed metadata ({exc!r})", site=self.name
            ) from exc
        if isinstance(meta, dict) and meta.get("compress") == ZSTD:
            size = meta.get("size")
            return decompressed(
                self._chunks(f, path, 0),
                offset=offset,
                size=size if isinstance(size, int) else None,
                what=f"reading {path}",
                site=self.name,
            )
        return self._chunks(f, path, offset)

    def _chunks(self, f: BinaryIO, path: Path, offset: int) -> Iterator[bytes]:
        with f, self._io(f"reading {path}"):
            if offset:
                f.seek(offset)
            while chunk := f.read(CHUNK):
                yield chunk

    def create(self, new: NewImage) -> _DirWriter:
        self._require_root()
        check_name(new.name)  # before any I/O: a name the store cannot take is not an OS error
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
        meta["properties"] = unmarked(meta["properties"])
        meta["status"] = "active"
        meta["properties"].update(properties or {})
        write_atomic(hidden_meta, json.dumps(meta, indent=1).encode())
        os.replace(folder / f".{image_id}.img.partial", folder / f"{image_id}.img")
        fsync_dir(folder)
        os.replace(hidden_meta, folder / f"{image_id}.json")
        fsync_dir(folder)
        return self._record(meta)

    def delete(self, image_id: str) -> None:
        try:
            folder, _ = self._find(image_id)
        except NotFound:
            self._remove_leftovers(image_id)
            return
        with self._io(f"deleting image {image_id}"):
            for p in (
                f"{image_id}.json",
                f".{image_id}.json",
                f"{image_id}.img",
                f".{image_id}.img.partial",
            ):
                (folder / p).unlink(missing_ok=True)
            for tmp in folder.glob(f".*{image_id}*.tmp"):  # a crash inside write_atomic
                tmp.unlink(missing_ok=True)
        self._prune(folder)

    def _remove_leftovers(self, image_id: str) -> None:
        """An upload killed before its metadata was written leaves only its data and perhaps a
        temporary file: no record to find (``get_image`` says NotFound), yet its lease names
        the id, and recovery deletes by id. The fault suite found such files surviving."""
        _check_id(image_id)
        if not self.root.is_dir():
            return
        with self._io(f"deleting the leftovers of upload {image_id}"):
            for folder in self.root.iterdir():
                if not folder.is_dir():
                    continue
                (folder / f".{image_id}.img.partial").unlink(missing_ok=True)
                for tmp in folder.glob(f".*{image_id}*.tmp"):
                    tmp.unlink(missing_ok=True)

    def hide(self, image_id: str) -> None:
        folder, _ = self._find(image_id)
        meta_path = folder / f"{image_id}.json"
        with self._io(f"hiding image {image_id}"):
            meta = json.loads(meta_path.read_bytes())
            meta["hidden"] = True
            write_atomic(meta_path, json.dumps(meta, indent=1).encode())

    def images_in_use(self) -> set[str]:
        """Empty: no server boots from a store, so ``retire: delete`` may delete here."""
        return set()

    def check_connection(self) -> str:
        """Is the store directory there and writable (a file is made and removed to know)?"""
        path = self.root
        with self._io(f"looking at {path}"):
            if not path.exists():
                raise SiteError(
                    f"{path} does not exist: create it (mkdir -p {path})", site=self.name
                )
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
