"""The core Site protocol every kind of site implements, the optional ones some offer, and the
capabilities filled from them.

The engine (transfer, plan, execute) is written once against :class:`Site`, as rclone's
``fs.Fs`` lets ``fs/sync`` ignore which backend it drives. An optional ability is a small
protocol of its own (:class:`Hiding`, :class:`ChangeListing`, :class:`InUseReporting`,
:class:`OwnerReporting`, :class:`URLSharing`, :class:`URLImporting`; later snapshots): a
site that lacks the ability simply lacks the method. :meth:`Capabilities.fill` turns the
ones a site implements into bound callables, once, when the site is built and without any
network I/O (rclone's ``Features.Fill``), so the engine asks
``if (hide := site.capabilities.hide) is not None: hide(image_id)`` and never ``isinstance``.

Writing is push-style and two-phase, so nothing half-made is ever visible:

1. ``create(new)`` makes an invisible, marked placeholder and returns a :class:`Writer`;
2. the engine ``write()``s chunks, then ``finish()`` returns the record as the site stores it
   (with the hashes the site computed: every algorithm in ``capabilities.hashes``), still
   invisible;
3. the engine verifies the hashes, then ``publish()`` makes the image visible under its name;
   on any failure ``abort()`` (or ``delete()`` after finish) removes every trace.

Every method raises only :class:`~imagesync.errors.SiteError` and its kinds (``NotFound`` for
an id that is not there, ``TransientError`` for a failure worth retrying, ...): a site maps its
library's and the operating system's exceptions at its boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, runtime_checkable

from imagesync.model import ImageRecord, NewImage


class Writer(Protocol):
    """An upload in progress to one site."""

    @property
    def image_id(self) -> str: ...

    def write(self, chunk: bytes) -> None:
        """Send the next chunk. May block (back-pressure). Raises SiteError on failure."""

    def finish(self) -> ImageRecord:
        """All bytes sent: wait until the site stored them; return the unpublished record,
        carrying a hash for every algorithm in the site's ``capabilities.hashes``."""

    def abort(self) -> None:
        """Give up: remove everything this upload made. Never raises."""


@runtime_checkable
class Hiding(Protocol):
    """A site that can hide an image from default listings instead of deleting it."""

    def hide(self, image_id: str) -> None:
        """Hide the image (it stays listed by ``list_images``, marked hidden). Raises NotFound."""


@runtime_checkable
class ChangeListing(Protocol):
    """A site that can list only what changed since a watermark, so that an idle pass does not
    re-read thousands of unchanged images."""

    def list_changed(self, since: str) -> tuple[list[ImageRecord], str]:
        """Images created or updated at or after ``since`` (the site's own clock, as returned
        by the previous call; "" for everything), and the watermark for the next call.
        Deletions show up only in a full ``list_images``."""


@runtime_checkable
class InUseReporting(Protocol):
    """A site that can tell which images a server still uses."""

    def images_in_use(self) -> set[str] | None:
        """Ids of the images a server still uses, or None when the site cannot tell now (it
        logs why): then nothing is deleted on its word (``retire: delete`` hides instead)."""


@runtime_checkable
class OwnerReporting(Protocol):
    """A site whose images have owners (Glance: projects), not all of them imagesync's."""

    def trusted_owners(self) -> frozenset[str]:
        """The owners whose images count as versions here: the project imagesync
        authenticates as, plus those the configuration trusts. May ask the site once."""


@dataclass(frozen=True)
class SharedURL:
    """A URL from which anyone holding it may read one image's bytes for a while (a VOSpace
    pre-authorized endpoint). ``url`` is a secret (it carries the grant): show ``shown``."""

    url: str
    #: the URL with its secret part replaced: what logs and errors may contain
    shown: str
    #: the number of bytes the URL serves (as the source's service says)
    size: int
    #: the secret part alone (the grant), scrubbed wherever it shows up
    secret: str = ""

    def __repr__(self) -> str:  # never print the grant, not even in a traceback's locals
        return f"SharedURL({self.shown!r}, size={self.size})"

    def scrub(self, text: str) -> str:
        """``text`` with the URL, and its secret part anywhere, replaced."""
        text = text.replace(self.url, self.shown)
        return text.replace(self.secret, "…") if self.secret else text


@runtime_checkable
class URLSharing(Protocol):
    """A source that can hand out a URL another service may fetch an image from without
    imagesync's credentials (VOSpace: a pre-authorized transfer endpoint)."""

    def share_url(self, image: ImageRecord) -> SharedURL | None:
        """A URL serving exactly ``image``'s stored bytes, checked to work without
        credentials; None when it cannot offer one for this image (it logs why). Raises
        SiteError only for a failure worth reporting (the caller relays the bytes then)."""


@runtime_checkable
class URLImporting(Protocol):
    """A target that can fetch an image itself from a URL (Glance's ``web-download``)."""

    def imports_urls(self) -> bool:
        """Whether it can now: asked of the service once (a lazy probe), then remembered; a
        cloud configured with ``server_side: false`` answers False without asking."""

    def create_for_import(self, new: NewImage) -> str:
        """Make the same invisible, marked placeholder :meth:`Site.create` makes, with no
        upload; return its id."""

    def import_url(
        self, image_id: str, url: SharedURL, should_stop: Callable[[], bool]
    ) -> ImageRecord:
        """Have the placeholder fetch ``url`` and wait until it holds the bytes: the
        unpublished record with the hashes the site computed. Raises SiteError when the
        import failed or timed out (the caller deletes the placeholder), Cancelled when
        ``should_stop()``. Messages never contain ``url.url``."""


# A later Snapshotting protocol (Nova: snapshot a server into an image) joins the ones above,
# with its field in Capabilities and its line in Capabilities.fill.


@dataclass(frozen=True)
class Capabilities:
    """What a site can do beyond the core protocol: filled once by :meth:`fill`.

    Each optional ability is the site's bound method, or None when the site lacks it.
    """

    #: hash algorithms the site computes for what it stores (``Writer.finish`` reports them)
    hashes: frozenset[str] = frozenset()
    #: the hashes an image's record carries were all computed by the site itself, in one pass
    #: over the bytes it stores (Glance's ``checksum`` and ``os_hash_value``): once the bytes
    #: read match its sha512, its md5 is the md5 of those bytes too, and a copy need not compute
    #: it (``transfer.py``). False where a hash is a claim (a VOSpace node's sha512 property)
    joint_hashes: bool = False
    #: its writers hash (sha512) every byte they are handed, in order, and ``finish`` claims
    #: that digest only when what the site stored is exactly those bytes (a compressed store:
    #: its service vouches for the frame, the writer for what the frame was made of): a copy
    #: whose one target it is need not hash its read as well (``transfer.py``)
    hashes_handed: bool = False
    hide: Callable[[str], None] | None = None
    list_changed: Callable[[str], tuple[list[ImageRecord], str]] | None = None
    images_in_use: Callable[[], set[str] | None] | None = None
    #: None: every image there is imagesync's to count (stores)
    trusted_owners: Callable[[], frozenset[str]] | None = None
    #: a source that hands out URLs for its images (:class:`URLSharing`)
    share_url: Callable[[ImageRecord], SharedURL | None] | None = None
    #: a target that may fetch images from URLs itself (:class:`URLImporting`): the site
    url_import: URLImporting | None = None

    @classmethod
    def fill(
        cls,
        site: object,
        *,
        hashes: Iterable[str] = (),
        joint_hashes: bool = False,
        hashes_handed: bool = False,
    ) -> Capabilities:
        """The capabilities of ``site``, from the optional protocols it implements.

        The one place that asks which protocols a site implements. No I/O: call it when the
        site is built.
        """
        return cls(
            hashes=frozenset(hashes),
            joint_hashes=joint_hashes,
            hashes_handed=hashes_handed,
            hide=site.hide if isinstance(site, Hiding) else None,
            list_changed=site.list_changed if isinstance(site, ChangeListing) else None,
            images_in_use=site.images_in_use if isinstance(site, InUseReporting) else None,
            trusted_owners=site.trusted_owners if isinstance(site, OwnerReporting) else None,
            share_url=site.share_url if isinstance(site, URLSharing) else None,
            url_import=site if isinstance(site, URLImporting) else None,
        )


@runtime_checkable
class Site(Protocol):
    """A place images live. Kinds: glance.GlanceSite, directory.DirectorySite,
    memory.MemorySite (the in-memory one for tests), listed in ``imagesync.sites.KINDS``."""

    name: str
    kind: str

    @property
    def capabilities(self) -> Capabilities:
        """Filled once when the site is built (:meth:`Capabilities.fill`), without I/O."""

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        """Every image (all visibilities, hidden ones and unpublished uploads included), or only
        those named ``name``."""

    def get_image(self, image_id: str) -> ImageRecord:
        """One image by id. Raises NotFound."""

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        """Stream the image's bytes from ``offset``. Raises NotFound at the call (not at the
        first chunk). The iterator must be closed or exhausted."""

    def create(self, new: NewImage) -> Writer:
        """Start an invisible upload of a new image."""

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        """Make a finished, verified upload visible under its name, setting final properties.
        Raises NotFound."""

    def delete(self, image_id: str) -> None:
        """Delete an image. Missing images are not an error."""

    def check_connection(self) -> str:
        """Authenticate to / reach the site and return one secret-free line saying what
        answered; raise SiteError (AuthError, TransientError, ...) with a sentence saying what
        to fix if it cannot be reached."""

    def close(self) -> None:
        """Release connections."""


class GlanceFields(TypedDict):
    """The plain fields of an :class:`ImageRecord` that Glance and a directory store's metadata
    file name and read alike (the directory store copies Glance's names on purpose)."""

    size: int | None
    disk_format: str | None
    container_format: str | None
    min_disk: int
    min_ram: int
    visibility: str


def glance_fields(raw: Mapping[str, Any]) -> GlanceFields:
    """:class:`GlanceFields` read from a Glance image document (or a directory store's copy)."""
    return GlanceFields(
        size=int(raw["size"]) if raw.get("size") is not None else None,
        disk_format=raw.get("disk_format"),
        container_format=raw.get("container_format"),
        min_disk=int(raw.get("min_disk") or 0),
        min_ram=int(raw.get("min_ram") or 0),
        visibility=str(raw.get("visibility") or "private"),
    )
