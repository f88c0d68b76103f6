"""Plain data shared by every layer: hashes, image records, versions with provenance, inventories.

Nothing here does I/O. A *record* is what a site reports about one stored image; its *version*
(origin, version time, sha512) is derived from imagesync's provenance properties when they are
consistent with the record itself, otherwise from the record alone, so that a copy never looks
newer than its original and an image that merely inherited the marks (a Nova snapshot of a copy,
whose properties Nova copies from its base image) is a version of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypedDict

PROP_ORIGIN = "imagesync.origin"
PROP_VERSION = "imagesync.version"
PROP_SHA512 = "imagesync.sha512"
#: set while imagesync is still writing an image; such an image is never a version
PROP_STATE = "imagesync.state"
STATE_UPLOADING = "uploading"


def marked_uploading(properties: Mapping[str, str]) -> dict[str, str]:
    """An upload's properties: ``properties`` with the mark every site writes at ``create``."""
    return {**properties, PROP_STATE: STATE_UPLOADING}


def unmarked(properties: Mapping[str, str]) -> dict[str, str]:
    """``properties`` without the upload mark: what ``publish`` leaves."""
    return {k: v for k, v in properties.items() if k != PROP_STATE}


#: who owns an unpublished upload and until when (see imagesync.engine.marker)
PROP_UPLOAD = "imagesync.upload"
#: on a copy imagesync converted to another disk format (see imagesync.convert): the original's
#: ``FORMAT:SHA512``; ``imagesync.sha512`` stays the original's (a version's identity), and
#: the copy's own sha512 (its stored bytes) is in ``imagesync.converted_sha512``
PROP_CONVERTED_FROM = "imagesync.converted_from"
PROP_CONVERTED_SHA512 = "imagesync.converted_sha512"

#: a rule's boot test: ``passed <time>`` on the image that was booted (imagesync.boottest)
PROP_BOOT_TEST = "imagesync.boot-test"
#: why a version failed its boot test; on any trusted image of a version, that version is no
#: longer a version of its name: never copied, never answered, never retires an older one
PROP_QUARANTINED = "imagesync.quarantined"

PROVENANCE_KEYS = frozenset(
    {
        PROP_ORIGIN,
        PROP_VERSION,
        PROP_SHA512,
        PROP_STATE,
        PROP_UPLOAD,
        PROP_CONVERTED_FROM,
        PROP_CONVERTED_SHA512,
    }
)
#: what Nova writes on an image it made from a server (snapshot or backup); Nova also copies
#: every property of the server's base image, imagesync's marks included
PROP_IMAGE_TYPE = "image_type"
PROP_INSTANCE_UUID = "instance_uuid"
SNAPSHOT_TYPES = frozenset({"snapshot", "backup"})
#: Nova's marks of the server an image came from: meaningless on another cloud, and a copy
#: carrying them would look like a snapshot there (and so like a version of its own)
NOVA_SERVER_KEYS = frozenset({PROP_IMAGE_TYPE, PROP_INSTANCE_UUID, "base_image_ref"})

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


def printable(value: object) -> str:
    """``value`` as text safe to print on a terminal: every control or format character
    (escape sequences, carriage returns, bidirectional overrides) written as an escape, so a
    name or property set by anyone on a cloud cannot rewrite what an operator sees."""
    text = str(value)
    if text.isprintable():  # the usual case: nothing to escape (space counts as printable)
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


@dataclass(frozen=True)
class Version:
    """Which version of a name an image holds: where it came from, when, and which bytes."""

    origin: str  # "<site>:<id>" of the original image
    time: datetime  # the original's creation time (UTC), by the clock of the original's site
    sha512: str | None  # hex, None when not known yet
    #: when imagesync first saw this version (its own clock), None when not known
    seen: datetime | None = None

    def key(self) -> tuple[datetime, datetime, str]:
        """Sort key: the version imagesync saw first is older, whatever the sites' clocks say;
        versions first seen together (one listing) are ordered by their creation time, then
        deterministically by sha512 (then origin). Without first-seen times (plain data in
        tests) this is the creation time alone."""
        return (self.seen or self.time, self.time, (self.sha512 or "") + "|" + self.origin)

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
    #: the project that owns it (Glance ``owner``); None where sites have no owners (stores)
    owner: str | None = None
    #: when imagesync first saw this record's version (its own clock): set by the engine
    #: from the state database, so that "newest" does not depend on the sites' clocks
    first_seen: datetime | None = None

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

    @property
    def is_server_image(self) -> bool:
        """Nova made it from a server (a snapshot or backup): it inherited its base image's
        properties, so imagesync's marks on it describe the base image, not these bytes."""
        props = self.properties
        return props.get(PROP_IMAGE_TYPE) in SNAPSHOT_TYPES or bool(props.get(PROP_INSTANCE_UUID))

    @property
    def converted(self) -> bool:
        """A copy imagesync converted to another disk format: the same version as its
        original (``imagesync.sha512`` is the original's), other bytes."""
        return PROP_CONVERTED_FROM in self.properties

    @property
    def provenance_ok(self) -> bool:
        """Do imagesync's provenance marks describe this very record? Only when present, not
        inherited by a Nova snapshot, and not contradicted by the site's own sha512 of the bytes
        it stores (a user who changed a copy and uploaded it with the same properties). A
        converted copy's bytes are checked against its own recorded sha512, not the
        original's."""
        props = self.properties
        if PROP_ORIGIN not in props or self.is_server_image:
            return False
        claimed, own = props.get(PROP_SHA512), self.hashes.get("sha512")
        if self.converted:
            claimed = props.get(PROP_CONVERTED_SHA512)
            if not claimed:  # a converted copy must say which bytes it holds
                return False
        return not (claimed and own and claimed.lower() != own.lower())

    @functools.cached_property
    def origin(self) -> str:  # cached: the engine and the planner ask for it per record
        """The ``site:id`` of the original this record's version came from."""
        if self.provenance_ok:
            return self.properties[PROP_ORIGIN]
        return self.ref

    @functools.cached_property
    def version(self) -> Version:  # cached: planning asks for it many times per record
        props = self.properties
        if self.provenance_ok:
            vtime = parse_time(props.get(PROP_VERSION)) or self.created_at
            # A copy whose claimed version is newer than its own creation is lying: clamp it.
            vtime = min(vtime, self.created_at)
            # a converted copy's own bytes are not the version's: only the mark names it
            own = None if self.converted else self.hashes.get("sha512")
            sha = props.get(PROP_SHA512) or own
        else:  # an original: its own origin, its own creation time, its own bytes
            vtime = self.created_at
            sha = self.hashes.get("sha512")
        if sha is not None and not (len(sha) == 128 and _HEX.match(sha.lower())):
            sha = None
        return Version(
            origin=self.origin,
            time=vtime,
            sha512=sha.lower() if sha else None,
            seen=self.first_seen,
        )

    def user_properties(self) -> dict[str, str]:
        """The image's own properties, as a copy elsewhere carries them: without imagesync's
        provenance marks and without Nova's marks of the server it came from."""
        return {
            k: v
            for k, v in self.properties.items()
            if k not in PROVENANCE_KEYS and k not in NOVA_SERVER_KEYS
        }

    def with_(self, **changes: object) -> ImageRecord:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def seen_first(self, when: datetime) -> ImageRecord:
        """This record with ``first_seen`` set. The engine stamps every listed record on
        every pass, so this copies the instance's dict instead of going through
        ``dataclasses.replace`` (which re-runs ``__init__``: measured several times slower,
        about a second per pass over 15,000 records on a loaded host); the cached ``version``
        is dropped with it (``origin`` does not depend on ``first_seen``: it stays)."""
        new = object.__new__(ImageRecord)
        fields = dict(self.__dict__)
        fields.pop("version", None)
        fields["first_seen"] = when
        new.__dict__.update(fields)
        return new


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
    #: the md5 (hex) the bytes to be sent have, when the copy holds it without computing it
    #: (the source's own, ``transfer.py``): a target whose service checks an upload's digest
    #: sends it (VOSpace: ``Digest: md5=``, refused with 412 when the bytes differ)
    md5: str | None = None


class Layout(TypedDict):
    """What a copy keeps of its original besides bytes, name and properties: the formats and
    the minimums a server needs to boot it. One list, so that a field added here reaches
    every place that copies it (``transfer.new_image_for``, each site's ``create``)."""

    disk_format: str | None
    container_format: str | None
    min_disk: int
    min_ram: int


def layout_of(image: ImageRecord | NewImage) -> Layout:
    """``image``'s :class:`Layout`, as keyword arguments for the next record or request."""
    return Layout(
        disk_format=image.disk_format,
        container_format=image.container_format,
        min_disk=image.min_disk,
        min_ram=image.min_ram,
    )


@dataclass(frozen=True)
class SiteInventory:
    """Everything a site holds at one moment, or why it could not be listed."""

    site: str
    images: tuple[ImageRecord, ...] = ()
    error: str | None = None
    listed_at: datetime | None = None
    #: ids of images a server still uses; None when the site cannot tell
    in_use: frozenset[str] | None = None
    #: the owners (projects) whose images count as versions here: the project imagesync
    #: authenticates as, plus a cloud's ``trusted_owners``; None: every image counts (stores,
    #: where every image is imagesync's own)
    trusted_owners: frozenset[str] | None = None
    #: ids of the images imagesync recorded publishing here (state database): the only ones
    #: retention may hide or delete
    made: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return self.error is None

    def trusts(self, rec: ImageRecord) -> bool:
        """May this image count as a version (is its owner trusted here)?"""
        return self.trusted_owners is None or rec.owner in self.trusted_owners

    def named(self, name: str) -> list[ImageRecord]:
        """Every image called ``name``, whoever owns it."""
        return [i for i in self.images if i.name == name]

    def trusted(self, name: str) -> list[ImageRecord]:
        """The images called ``name`` that may count as versions (see ``trusts``)."""
        return [i for i in self.images if i.name == name and self.trusts(i)]

    def foreign(self, name: str) -> list[ImageRecord]:
        """The images called ``name`` owned by someone imagesync does not trust here."""
        return [i for i in self.images if i.name == name and not self.trusts(i)]


# --------------------------------------------------------------------------- disk formats

#: the disk formats Glance knows (``disk_format``); a cloud's ``disk_formats:`` names some
DISK_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhd", "vhdx", "iso", "ploop", "ami", "ari", "aki")
#: those ``qemu-img`` converts between, with qemu's own name for each (Glance's vhd is vpc)
QEMU_FORMATS: Mapping[str, str] = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vdi": "vdi",
    "vhd": "vpc",
    "vhdx": "vhdx",
}


@dataclass(frozen=True)
class FormatChoice:
    """How a version reaches one target: as it is (``convert_to`` None), converted to
    ``convert_to``, or not at all (``refused`` says why, for people)."""

    convert_to: str | None = None
    refused: str | None = None

    @property
    def as_is(self) -> bool:
        return self.convert_to is None and self.refused is None


def choose_format(source_format: str | None, accepted: tuple[str, ...]) -> FormatChoice:
    """Which format a version in ``source_format`` takes on a site that accepts ``accepted``
    (preferred first; empty: anything, as it is). Pure: the executor acts on the answer."""
    if not accepted or source_format in accepted:
        return FormatChoice()
    wants = "/".join(accepted)
    if source_format is None:
        return FormatChoice(refused=f"the site accepts only {wants} and the source has no format")
    if source_format not in QEMU_FORMATS:
        return FormatChoice(
            refused=f"the site accepts only {wants}, and a {source_format} image "
            "cannot be converted (qemu-img converts only "
            f"{', '.join(QEMU_FORMATS)})"
        )
    for fmt in accepted:
        if fmt in QEMU_FORMATS:
            return FormatChoice(convert_to=fmt)
    return FormatChoice(
        refused=f"the site accepts only {wants}: none is a format qemu-img writes "
        f"({', '.join(QEMU_FORMATS)})"
    )
