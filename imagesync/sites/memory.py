"""An in-memory Site, shipped with the code for planner, transfer, engine and daemon tests.

It passes the same contract suite as every real site (``tests/contract``), so a test written
against it cannot drift from what Glance or a directory store do: invisible until published,
hashes computed on store, ``NotFound`` for an id that is not there, deleting a missing id is no
error, and every failure is a :class:`~imagesync.errors.SiteError`.

Faults are passed in, as httpx's ``MockTransport`` takes its handler (never chosen by an
environment variable): a :class:`Faults` value with the common ones (flip a byte on store, fail
writes after N bytes, corrupt reads, fail listings), and its ``hook``, called as
``hook(operation, image_id)`` before every operation, which may raise. An ``OSError`` it raises
becomes a ``TransientError``, as a real site maps a dropped connection.

A plain :class:`MemorySite` can hide images; :class:`ChangeListingMemorySite` can also list
changes since a watermark (``memory_site(..., list_changes=True)`` picks it).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from imagesync.errors import NotFound, SiteError, TransientError
from imagesync.model import (
    ImageRecord,
    NewImage,
    format_time,
    layout_of,
    marked_uploading,
    parse_time,
    unmarked,
)
from imagesync.sites.base import Capabilities

HASHES = frozenset({"sha512", "md5"})
#: what ``open`` yields at a time: small, so tests see many chunks of a small image
CHUNK = 1000

#: ``hook(operation, image_id)``: operation is the Site or Writer method's name
#: ("list_images", "create", "write", "open", ...), image_id None where there is none
FaultHook = Callable[[str, str | None], None]


@dataclass
class Faults:
    """Failures to inject. Mutable: a test may change them between passes."""

    flip_byte_on_store: bool = False
    fail_write_after: int | None = None  # bytes
    fail_write_times: int = 0  # how many uploads fail (then succeed)
    fail_write_transient: bool = True
    corrupt_read: bool = False
    fail_list: bool = False
    hook: FaultHook | None = None


@dataclass
class Stored:
    """One image as the memory site holds it."""

    rec: ImageRecord
    data: bytearray = field(default_factory=bytearray)
    published: bool = False


def _hashes(data: bytes | bytearray) -> dict[str, str]:
    return {
        "sha512": hashlib.sha512(data).hexdigest(),
        "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
    }


class MemoryWriter:
    """An upload to a memory site: bytes gather in the stored image until ``finish``."""

    def __init__(self, site: MemorySite, stored: Stored) -> None:
        self.site = site
        self.stored = stored

    @property
    def image_id(self) -> str:
        return self.stored.rec.id

    def write(self, chunk: bytes) -> None:
        self.site.fault("write", self.image_id)
        f = self.site.faults
        if (
            f.fail_write_after is not None
            and f.fail_write_times > 0
            and len(self.stored.data) + len(chunk) > f.fail_write_after
        ):
            f.fail_write_times -= 1
            cls = TransientError if f.fail_write_transient else SiteError
            raise cls("connection reset by peer", site=self.site.name)
        self.stored.data.extend(chunk)

    def finish(self) -> ImageRecord:
        self.site.fault("finish", self.image_id)
        data = self.stored.data
        if self.site.faults.flip_byte_on_store and data:
            data[len(data) // 2] ^= 0xFF
        self.stored.rec = self.stored.rec.with_(
            status="active", size=len(data), hashes=_hashes(data), updated_at=_now()
        )
        return self.stored.rec

    def abort(self) -> None:
        self.site.images.pop(self.stored.rec.id, None)


def _now() -> datetime:
    return datetime.now(UTC)


class MemorySite:
    """A Site held in a dict (core protocol + hiding). Not persistent, thread-safe enough for
    the engine's transfer threads (dict operations are atomic; one lock guards changes)."""

    kind = "memory"

    def __init__(
        self,
        name: str,
        faults: Faults | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.name = name
        self.faults = faults or Faults()
        #: the site's own clock for ``created_at``: a test may skew it (a cloud running late)
        self.clock = clock or _now
        self.images: dict[str, Stored] = {}
        self.reads = 0  # how many times ``open`` was called: tests count source reads
        self._lock = threading.Lock()
        # both hashes computed on store, over the same bytes, as Glance does
        self.capabilities = Capabilities.fill(self, hashes=HASHES, joint_hashes=True)

    # -- for tests ---------------------------------------------------------------------------
    def add(
        self,
        name: str,
        data: bytes,
        *,
        created: datetime | None = None,
        props: Mapping[str, str] | None = None,
        status: str = "active",
        hashes: Mapping[str, str] | None = None,
        protected: bool = False,
    ) -> ImageRecord:
        """Put an image here as a person would (not through imagesync)."""
        image_id = str(uuid.uuid4())
        rec = ImageRecord(
            site=self.name,
            id=image_id,
            name=name,
            status=status,
            created_at=created or self.clock(),
            size=len(data),
            hashes=dict(hashes) if hashes is not None else _hashes(data),
            disk_format="raw",
            container_format="bare",
            properties=dict(props or {}),
            protected=protected,
        )
        self.images[image_id] = Stored(rec, bytearray(data), published=True)
        return rec

    def data(self, image_id: str) -> bytes:
        return bytes(self._stored(image_id).data)

    def fault(self, op: str, image_id: str | None = None) -> None:
        """Run the injected hook, if any; an OSError becomes a TransientError (as a real site
        maps a dropped connection)."""
        if self.faults.hook is None:
            return
        try:
            self.faults.hook(op, image_id)
        except OSError as exc:
            raise TransientError(f"{op}: {exc}", site=self.name) from exc

    def _stored(self, image_id: str) -> Stored:
        try:
            return self.images[image_id]
        except KeyError:
            raise NotFound(f"no image {image_id}", site=self.name) from None

    def _change(self, image_id: str, **fields: object) -> ImageRecord:
        with self._lock:
            s = self._stored(image_id)
            s.rec = s.rec.with_(updated_at=_now(), **fields)
            return s.rec

    # -- Site --------------------------------------------------------------------------------
    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        self.fault("list_images")
        if self.faults.fail_list:
            raise TransientError("connection refused", site=self.name)
        return [s.rec for s in list(self.images.values()) if name is None or s.rec.name == name]

    def get_image(self, image_id: str) -> ImageRecord:
        self.fault("get_image", image_id)
        return self._stored(image_id).rec

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        self.fault("open", image.id)
        self.reads += 1
        data = bytes(self._stored(image.id).data[offset:])  # NotFound here, not at next()
        if self.faults.corrupt_read and data:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return (data[i : i + CHUNK] for i in range(0, len(data), CHUNK))

    def create(self, new: NewImage) -> MemoryWriter:
        self.fault("create")
        image_id = str(uuid.uuid4())
        props = marked_uploading(new.properties)
        rec = ImageRecord(
            site=self.name,
            id=image_id,
            name=new.name,
            status="queued",
            created_at=self.clock(),
            **layout_of(new),
            properties=props,
            visibility=new.visibility,
            hidden=True,
        )
        stored = Stored(rec)
        self.images[image_id] = stored
        return MemoryWriter(self, stored)

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        self.fault("publish", image_id)
        props = unmarked(self._stored(image_id).rec.properties)
        props.update(properties or {})
        rec = self._change(image_id, properties=props, hidden=False)
        self.images[image_id].published = True
        return rec

    def delete(self, image_id: str) -> None:
        self.fault("delete", image_id)
        self.images.pop(image_id, None)

    def hide(self, image_id: str) -> None:
        self.fault("hide", image_id)
        self._change(image_id, hidden=True)

    def check_connection(self) -> str:
        self.fault("check_connection")
        return f"in memory ({len(self.images)} images)"

    def close(self) -> None:
        pass


class ChangeListingMemorySite(MemorySite):
    """A memory site that can also list the images changed since a watermark."""

    def __init__(self, name: str, faults: Faults | None = None) -> None:
        super().__init__(name, faults)
        self.changed_calls = 0  # tests tell an incremental listing from a full one

    def list_changed(self, since: str) -> tuple[list[ImageRecord], str]:
        self.fault("list_changed")
        self.changed_calls += 1
        if self.faults.fail_list:
            raise TransientError("connection refused", site=self.name)
        # Compared as times, not strings: "…:00Z" sorts after "…:00.5Z" as text.
        after = parse_time(since)
        recs = [s.rec for s in list(self.images.values())]
        out = [r for r in recs if after is None or (r.updated_at or r.created_at) >= after]
        stamps = [r.updated_at or r.created_at for r in recs]
        newest = max(stamps, default=None)
        if newest is None or (after is not None and after >= newest):
            return out, since
        return out, format_time(newest)


def memory_site(
    name: str, faults: Faults | None = None, *, list_changes: bool = False
) -> MemorySite:
    """A memory site; with ``list_changes`` one that can list changes since a watermark."""
    cls = ChangeListingMemorySite if list_changes else MemorySite
    return cls(name, faults)
