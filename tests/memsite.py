"""An in-memory Site for planner, transfer and engine unit tests (a fake at the seam, injected).

It follows the Site protocol's contract (invisible until published, hashes computed on store,
NotFound for missing ids) and lets a test inject failures: flip a byte on store, fail a write
after N bytes (transiently or not), or fail reads.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from imagesync.errors import NotFound, SiteError, TransientError
from imagesync.model import PROP_STATE, STATE_UPLOADING, ImageRecord, NewImage, format_time
from imagesync.sites.base import Capabilities


@dataclass
class Faults:
    flip_byte_on_store: bool = False
    fail_write_after: int | None = None  # bytes
    fail_write_times: int = 0  # how many uploads fail (then succeed)
    fail_write_transient: bool = True
    corrupt_read: bool = False
    fail_list: bool = False
    list_changes: bool = False  # offer incremental listing


@dataclass
class _Stored:
    rec: ImageRecord
    data: bytearray = field(default_factory=bytearray)
    published: bool = False


class MemWriter:
    def __init__(self, site: MemSite, stored: _Stored) -> None:
        self.site = site
        self.stored = stored

    @property
    def image_id(self) -> str:
        return self.stored.rec.id

    def write(self, chunk: bytes) -> None:
        f = self.site.faults
        if (f.fail_write_after is not None and f.fail_write_times > 0
                and len(self.stored.data) + len(chunk) > f.fail_write_after):
            f.fail_write_times -= 1
            cls = TransientError if f.fail_write_transient else SiteError
            raise cls("connection reset by peer", site=self.site.name)
        self.stored.data.extend(chunk)

    def finish(self) -> ImageRecord:
        data = self.stored.data
        if self.site.faults.flip_byte_on_store and data:
            data[len(data) // 2] ^= 0xFF
        hashes = {"sha512": hashlib.sha512(data).hexdigest(),
                  "md5": hashlib.md5(data).hexdigest()}
        self.stored.rec = self.stored.rec.with_(status="active", size=len(data), hashes=hashes)
        return self.stored.rec

    def abort(self) -> None:
        self.site.images.pop(self.stored.rec.id, None)


class MemSite:
    kind = "memory"

    def __init__(self, name: str, faults: Faults | None = None) -> None:
        self.name = name
        self.faults = faults or Faults()
        self.images: dict[str, _Stored] = {}
        self.reads = 0
        self.hidden_ids: set[str] = set()
        self.changed_calls = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(hashes=frozenset({"sha512", "md5"}), hide=True,
                            list_changes=self.faults.list_changes)

    def add(self, name: str, data: bytes, *, created: datetime | None = None,
            props: Mapping[str, str] | None = None, status: str = "active",
            hashes: Mapping[str, str] | None = None, protected: bool = False) -> ImageRecord:
        """Put an image here as a person would (not through imagesync)."""
        image_id = str(uuid.uuid4())
        rec = ImageRecord(
            site=self.name, id=image_id, name=name, status=status,
            created_at=created or datetime.now(UTC), size=len(data),
            hashes=dict(hashes) if hashes is not None else {
                "sha512": hashlib.sha512(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()},
            disk_format="raw", container_format="bare", properties=dict(props or {}),
            protected=protected)
        self.images[image_id] = _Stored(rec, bytearray(data), published=True)
        return rec

    def data(self, image_id: str) -> bytes:
        return bytes(self.images[image_id].data)

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        if self.faults.fail_list:
            raise TransientError("connection refused", site=self.name)
        return [s.rec for s in self.images.values() if name is None or s.rec.name == name]

    def list_changed(self, since: str) -> tuple[list[ImageRecord], str]:
        self.changed_calls += 1
        if self.faults.fail_list:
            raise TransientError("connection refused", site=self.name)
        recs = [s.rec for s in self.images.values()]
        stamp = [format_time(r.updated_at or r.created_at) for r in recs]
        out = [r for r, t in zip(recs, stamp, strict=True) if t >= since]
        return out, max(stamp + [since])

    def get_image(self, image_id: str) -> ImageRecord:
        if image_id not in self.images:
            raise NotFound(f"no image {image_id}", site=self.name)
        return self.images[image_id].rec

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        self.reads += 1
        data = bytes(self.get_and_data(image.id)[offset:])
        if self.faults.corrupt_read and data:
            data = data[:-1] + bytes([data[-1] ^ 1])
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    def get_and_data(self, image_id: str) -> bytearray:
        if image_id not in self.images:
            raise NotFound(f"no image {image_id}", site=self.name)
        return self.images[image_id].data

    def create(self, new: NewImage) -> MemWriter:
        image_id = str(uuid.uuid4())
        props = dict(new.properties)
        props[PROP_STATE] = STATE_UPLOADING
        rec = ImageRecord(site=self.name, id=image_id, name=new.name, status="queued",
                          created_at=datetime.now(UTC), disk_format=new.disk_format,
                          container_format=new.container_format, min_disk=new.min_disk,
                          min_ram=new.min_ram, properties=props, visibility=new.visibility,
                          hidden=True)
        stored = _Stored(rec)
        self.images[image_id] = stored
        return MemWriter(self, stored)

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        s = self.images[image_id]
        props = {k: v for k, v in s.rec.properties.items() if k != PROP_STATE}
        props.update(properties or {})
        s.rec = s.rec.with_(properties=props, hidden=False)
        s.published = True
        return s.rec

    def delete(self, image_id: str) -> None:
        self.images.pop(image_id, None)

    def hide(self, image_id: str) -> None:
        s = self.images[image_id]
        s.rec = s.rec.with_(hidden=True)

    def images_in_use(self) -> set[str] | None:
        return None

    def check_connection(self) -> None:
        pass

    def close(self) -> None:
        pass
