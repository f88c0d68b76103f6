"""The one Site protocol every kind of site implements, and the capabilities it may offer.

The engine (transfer, plan, execute) is written once against this protocol, as rclone's
``fs.Fs`` lets ``fs/sync`` ignore which backend it drives. Optional abilities are described by
:class:`Capabilities`, filled once when the site is opened, never by ``isinstance`` checks.

Writing is push-style and two-phase, so nothing half-made is ever visible:

1. ``create(new)`` makes an invisible, marked placeholder and returns a :class:`Writer`;
2. the engine ``write()``s chunks, then ``finish()`` returns the record as the site stores it
   (with the hashes the site computed) — still invisible;
3. the engine verifies the hashes, then ``publish()`` makes the image visible under its name;
   on any failure ``abort()`` (or ``delete()`` after finish) removes every trace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from imagesync.model import ImageRecord, NewImage


@dataclass(frozen=True)
class Capabilities:
    """What a site can do beyond the basics, probed once when it is opened."""

    #: hash algorithms the site itself computes/reports for stored data
    hashes: frozenset[str] = frozenset()
    #: can hide an image from default listings instead of deleting it (Glance os_hidden)
    hide: bool = False
    #: can tell whether a server still uses an image
    in_use_check: bool = False
    #: server-side import methods (web-download, glance-download, ...)
    import_methods: frozenset[str] = frozenset()
    #: can take Nova snapshots
    snapshot: bool = False
    #: honours image visibility (public/private/shared/community)
    visibility: bool = False
    #: honours the protected flag
    protected: bool = False
    #: can list only the images changed since a watermark (``list_changed``), so an idle
    #: pass does not re-read thousands of unchanged images
    list_changes: bool = False
    extra: dict[str, str] = field(default_factory=dict)


class Writer(Protocol):
    """An upload in progress to one site."""

    @property
    def image_id(self) -> str: ...

    def write(self, chunk: bytes) -> None:
        """Send the next chunk. May block (back-pressure). Raises SiteError on failure."""

    def finish(self) -> ImageRecord:
        """All bytes sent: wait until the site stored them; return the unpublished record."""

    def abort(self) -> None:
        """Give up: remove everything this upload made. Never raises."""


@runtime_checkable
class Site(Protocol):
    """A place images live. Implementations: glance.GlanceSite, directory.DirectorySite."""

    name: str
    kind: str

    @property
    def capabilities(self) -> Capabilities: ...

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        """Every image (all visibilities, hidden ones included), or only those named ``name``."""

    def list_changed(self, since: str) -> tuple[list[ImageRecord], str]:
        """Images created or updated at or after ``since`` (the site's own clock, as returned
        by the previous call; "" for everything), and the watermark for the next call. Only
        when ``capabilities.list_changes``; deletions show up only in a full ``list_images``."""

    def get_image(self, image_id: str) -> ImageRecord:
        """One image by id. Raises NotFound."""

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        """Stream the image's bytes from ``offset``. The iterator must be closed or exhausted."""

    def create(self, new: NewImage) -> Writer:
        """Start an invisible upload of a new image."""

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        """Make a finished, verified upload visible under its name, setting final properties."""

    def delete(self, image_id: str) -> None:
        """Delete an image. Missing images are not an error."""

    def hide(self, image_id: str) -> None:
        """Hide an image from default listings (only when capabilities.hide)."""

    def images_in_use(self) -> set[str] | None:
        """Ids of images a server still uses, or None when the site cannot tell."""

    def check_connection(self) -> None:
        """Authenticate / reach the site; raise SiteError (AuthError, TransientError) if not."""

    def close(self) -> None:
        """Release connections."""
