"""Plain data shared by every layer: hashes, image records, versions with provenance, inventories.

Nothing here does I/O. A *record* is what a site reports about one stored image; its *version*
(origin, version time, sha512) is derived from imagesync's provenance properties when present,
otherwise from the record itself, so that a copy never looks newer than its original.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

PROP_ORIGIN = "imagesync.origin"
PROP_VERSION = "imagesync.version"
PROP_SHA512 = "imagesync.sha512"
#: set while imagesync is still writing an image; such an image is never a version
PROP_STATE = "imagesync.state"
STATE_UPLOADING = "uploading"
#: who owns an unpublished upload and until when (see imagesync.engine.marker)
PROP_UPLOAD = "imagesync.upload"

PROVENANCE_KEYS = frozenset({PROP_ORIGIN, PROP_VERSION, PROP_SHA512, PROP_STATE, PROP_UPLOAD})

_HEX = re.compile(r"^[0-9a-f]+$")


def hashes_agree(a: Mapping[str, str], b: Mapping[str, str]) -> bool | None:
    """Compare two algo→hex maps honestly: True/False on a shared algorithm, None if none is shared.

    "Unknown" never counts as "equal". The strongest shared algorithm decides.
    """
    for algo in ("sha512", "sha384", "sha256", "sha1", "md5"):
        if a.get(algo) and b.get(algo):
            return a[algo].lower() == b[algo].lower()
    return None


def parse_time(value: str | datetime | None) -> datetime | None:
    """Parse an ISO 8601 time as Glance and imagesync write it; always timezone-aware UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def format_time(dt: datetime) -> str:
    """ISO 8601 UTC with a Z, microseconds kept only when present."""
    dt = dt.astimezone(UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Version:
    """Which version of a name an image holds: where it came from, when, and which bytes."""

    origin: str  # "<site>:<id>" of the original image
    time: datetime  # the original's creation time (UTC)
    sha512: str | None  # hex, None when not known yet

    def key(self) -> tuple[datetime, str]:
        """Sort key: newest time wins, ties broken deterministically by sha512 (then origin)."""
        return (self.time, (self.sha512 or "") + "|" + self.origin)

    def same_as(self, other: Version) -> bool:
        """Same version: same origin, or same time and the same known bytes."""
        if self.origin == other.origin:
            return True
        return bool(self.sha512 and self.sha512 == other.sha512)

    def short(self) -> str:
        return format_time(self.time) + (f" {self.sha512[:12]}" if self.sha512 else "")


@dataclass(frozen=True)
class ImageRecord:
    """One stored image as a site reports it."""

    site: str
    id: str
    name: str
    status: str  # Glance status; stores report "active" for complete data
    created_at: datetime
    size: int | None = None
    hashes: Mapping[str, str] = field(default_factory=dict)  # algo -> hex (sha512, md5, …)
    disk_format: str | None = None
    container_format: str | None = None
    min_disk: int = 0
    min_ram: int = 0
    properties: Mapping[str, str] = field(default_factory=dict)  # user + imagesync properties
    visibility: str = "private"
    protected: bool = False
    hidden: bool = False
    updated_at: datetime | None = None

    @property
    def ref(self) -> str:
        return f"{self.site}:{self.id}"

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def in_progress(self) -> bool:
        """imagesync is (or was, before a crash) still writing this image."""
        return self.properties.get(PROP_STATE) == STATE_UPLOADING

    @property
    def not_copyable_reason(self) -> str | None:
        """Why these bytes cannot be copied elsewhere, or None if they can."""
        if "block_device_mapping" in self.properties and not self.size:
            return "volume-backed snapshot (size 0, block_device_mapping): holds no data"
        if self.status != "active":
            return f"status {self.status}"
        if self.size == 0:
            return "no data"
        return None

    @property
    def counts(self) -> bool:
        """Only complete, active images with data are versions of their name."""
        return self.status == "active" and not self.in_progress

    @functools.cached_property
    def version(self) -> Version:  # cached: planning asks for it many times per record
        props = self.properties
        origin = props.get(PROP_ORIGIN) or self.ref
        vtime = parse_time(props.get(PROP_VERSION)) or self.created_at
        sha = props.get(PROP_SHA512) or self.hashes.get("sha512")
        if sha is not None and not (len(sha) == 128 and _HEX.match(sha.lower())):
            sha = None
        # A copy whose claimed version is newer than its own creation is lying: clamp it.
        if PROP_ORIGIN in props and vtime > self.created_at:
            vtime = self.created_at
        return Version(origin=origin, time=vtime, sha512=sha.lower() if sha else None)

    def user_properties(self) -> dict[str, str]:
        """The image's own properties, without imagesync's provenance marks."""
        return {k: v for k, v in self.properties.items() if k not in PROVENANCE_KEYS}

    def with_(self, **changes: object) -> ImageRecord:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NewImage:
    """What a target site is asked to create: name, formats, properties, expected size/hashes."""

    name: str
    disk_format: str | None
    container_format: str | None
    min_disk: int
    min_ram: int
    properties: Mapping[str, str]  # user properties + provenance (not reserved Glance keys)
    size: int | None
    visibility: str = "private"


@dataclass(frozen=True)
class SiteInventory:
    """Everything a site holds at one moment, or why it could not be listed."""

    site: str
    images: tuple[ImageRecord, ...] = ()
    error: str | None = None
    listed_at: datetime | None = None
    #: ids of images a server still uses; None when the site cannot tell
    in_use: frozenset[str] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def named(self, name: str) -> list[ImageRecord]:
        return [i for i in self.images if i.name == name]
