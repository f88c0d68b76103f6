"""Reading an image's bytes: from an offset, resuming a read that is cut part-way once the
source shows it still holds the same image, and reading a stored copy back to hash it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Generator, Iterator

import structlog

from imagesync.errors import SiteError, TransientError
from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_VERSION, ImageRecord
from imagesync.sites.base import Site
from imagesync.uploads import Tuning, check_cancel

# the copy's events keep the logger they always had
log = structlog.get_logger("imagesync.transfer")


def read_from(
    source: Site, image: ImageRecord, offset: int, tuning: Tuning, count: Callable[[bool], None]
) -> Generator[bytes, None, None]:
    """The source's bytes from ``offset``. A read cut part-way (a TransientError: a dropped
    connection) is opened again from where it stopped, ``tuning.resumes`` times, once the
    source shows it still holds the same image; ``count(resumed)`` hears of every open."""
    pos, resumes = offset, 0
    while True:
        stream: Iterator[bytes] | None = None
        try:
            count(resumes > 0)
            stream = source.open(image, pos)
            for chunk in stream:
                pos += len(chunk)
                yield chunk
            return
        except TransientError as exc:
            if resumes >= tuning.resumes:
                raise
            resumes += 1
            log.info(
                "copy.source_resumed", source=image.ref, offset=pos, resume=resumes, error=str(exc)
            )
            same_image(source, image)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def same_image(source: Site, image: ImageRecord) -> None:
    """Before a cut read resumes: the source must still hold the image whose first bytes were
    read (same size, hashes and version), or the bytes spliced together would be no image."""
    now = source.get_image(image.id)
    changed = [
        what
        for what, before, after in (
            ("status", image.status, now.status),
            ("size", image.size, now.size),
            ("hashes", dict(image.hashes), dict(now.hashes)),
            ("version", _mark(image), _mark(now)),
        )
        if before != after
    ]
    if changed:
        raise SiteError(
            f"{image.ref} changed while it was read ({', '.join(changed)}): not resumed",
            site=source.name,
        )


def _mark(image: ImageRecord) -> tuple[str | None, ...]:
    return tuple(image.properties.get(k) for k in (PROP_ORIGIN, PROP_VERSION, PROP_SHA512))


def read_back(
    site: Site, stored: ImageRecord, sha512: str, cancel: threading.Event | None = None
) -> bool:
    """The target reports no hash we share: read the copy back and hash it ourselves."""
    h = hashlib.sha512()
    stream = site.open(stored)
    try:
        for chunk in stream:
            check_cancel(cancel)
            h.update(chunk)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return h.hexdigest() == sha512
