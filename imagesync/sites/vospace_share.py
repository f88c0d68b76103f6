"""Pre-authorized read URLs of a VOSpace store: what a target cloud fetches an image from
itself (Glance's web-download), so the bytes do not pass through imagesync.

A ``pullFromVoSpace`` negotiation answers with endpoints; CADC's services put a grant in the
path of some (``…/preauth:TOKEN/…``), which then work without the caller's token or
certificate. Which endpoint works so is not said in the document, so each is tried as the
target will use it: a ``HEAD`` with no credentials at all, which must answer 200 with the
node's stored length. The first that does is handed out, with its secret part (the grant, or
a query string) masked in :attr:`SharedURL.shown`; none that does: no URL (the copy is
relayed). A compressed node is never shared: the target would import the zstd frame.
"""

from __future__ import annotations

import re
from typing import Protocol

import requests
import structlog

from imagesync.model import ImageRecord
from imagesync.sites.base import SharedURL
from imagesync.sites.vospace_transfer import ServiceSite, negotiate

log = structlog.get_logger("imagesync.vospace")


class _ShareSite(ServiceSite, Protocol):
    """What sharing needs of its site beyond a negotiation: its session's TLS settings."""

    session: requests.Session


_GRANT = re.compile(r"(preauth:)([^/?#]+)")


def mask(url: str) -> SharedURL:
    """``url`` as a SharedURL (size unknown: -1): the grant in its path, or its query, hidden."""
    m = _GRANT.search(url)
    if m is not None:
        return SharedURL(url, url[: m.start(2)] + "…" + url[m.end(2) :], -1, m.group(2))
    base, sep, query = url.partition("?")
    return SharedURL(url, base + ("?…" if sep else ""), -1, query if sep else "")


def share(site: _ShareSite, image: ImageRecord, path: str, compressed: bool) -> SharedURL | None:
    """A URL serving ``image``'s bytes (node ``path``) without credentials, or None."""
    if compressed:
        log.debug("share.none", site=site.name, image_id=image.id, reason="compressed")
        return None
    what = f"share {image.id}"
    endpoints = negotiate(site, path, "pullFromVoSpace", what)
    anonymous = requests.Session()
    anonymous.trust_env = False
    anonymous.verify = site.session.verify
    try:
        for url in endpoints:
            shared = mask(url)
            try:
                resp = anonymous.head(url, timeout=site.cfg.timeout, allow_redirects=True)
            except requests.RequestException as exc:
                log.debug(
                    "share.unusable", site=site.name, url=shared.shown, error=type(exc).__name__
                )
                continue
            length = resp.headers.get("Content-Length", "")
            if resp.status_code == 200 and length.isdigit():
                size = int(length)
                if image.size is None or size == image.size:
                    return SharedURL(shared.url, shared.shown, size, shared.secret)
            log.debug("share.unusable", site=site.name, url=shared.shown, status=resp.status_code)
    finally:
        anonymous.close()
    log.info(
        "share.none", site=site.name, image_id=image.id, reason="no endpoint works anonymously"
    )
    return None
