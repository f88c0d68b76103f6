"""A VOSpace store's transfers: the ``sync`` negotiation that names where bytes go or come
from (pushToVoSpace / pullFromVoSpace, each endpoint tried in turn), the reads (the ``files``
shortcut where offered; ``Range`` from an offset; a read cut part-way resumed from where it
stopped; a whole read checked against the service's ``Digest``) and the server-side MoveNode
job (UWS) that publishes an upload made under its hidden name.

Functions of the site (``sites/vospace.py``), whose ``call`` classifies and retries requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from urllib.parse import urljoin

import requests
import structlog

from imagesync.config.types import VOSpaceConfig
from imagesync.errors import NotFound, SiteError, TransientError
from imagesync.model import ImageRecord
from imagesync.sites.vosproto import (
    CORE,
    Service,
    classify,
    fault_text,
    md5_from_digest,
    parse_endpoints,
    transfer_xml,
    url_path,
)

log = structlog.get_logger("imagesync.vospace")


class ServiceSite(Protocol):
    """What a transfer (and a share) needs of its site; ``VOSpaceSite`` is one. A protocol,
    so that this module, which ``vospace`` imports, does not import ``vospace`` back."""

    name: str
    cfg: VOSpaceConfig
    #: the securityMethod a negotiation asks for ("" for none)
    security: str
    sleep: Callable[[float], None]

    def service(self) -> Service: ...
    def vos_uri(self, path: str) -> str: ...
    def call(self, method: str, url: str, what: str, **kw: Any) -> requests.Response:
        """A request whose answer must be one of ``ok`` (a keyword), else classified."""
        ...


CHUNK = 1 << 20
_RESUMES = 3  # a cut read is resumed this many times in a row without progress


def negotiate(site: ServiceSite, path: str, direction: str, what: str) -> list[str]:
    """A ``sync`` transfer: POST the document, follow the service's redirects (CADC: 303
    to ``…/results/transferDetails``), return the endpoints in order."""
    svc = site.service()
    scheme = "https" if svc.sync.startswith("https") else "http"
    verb = "put" if direction == "pushToVoSpace" else "get"
    protos: list[tuple[str, str | None]] = []
    for s in (scheme, "https" if scheme == "http" else "http"):
        proto = f"{CORE}{s}{verb}"
        if site.security:
            protos.append((proto, site.security))
        protos.append((proto, None))
    body = transfer_xml(site.vos_uri(path), direction, protos)
    resp = site.call(
        "POST",
        svc.sync,
        f"{what}: negotiate the transfer",
        data=body,
        headers={"Content-Type": "text/xml"},
        retry=False,
    )
    try:
        endpoints = parse_endpoints(resp.content)
    except ET.ParseError as exc:
        raise SiteError(f"{what}: the transfer document is not XML", site=site.name) from exc
    if not endpoints:
        raise SiteError(f"{what}: the service offered no endpoint", site=site.name)
    # an endpoint may be relative to the document it came in
    return [urljoin(resp.url, e) for e in endpoints]


def open_raw(
    site: ServiceSite, path: str, image: ImageRecord, offset: int, what: str
) -> Iterator[bytes]:
    """The stored bytes from ``offset``, as the service holds them."""
    urls = _read_urls(site, path, what)
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    last: SiteError | None = None
    for url in urls:
        try:
            resp = site.call(
                "GET", url, what, ok=(200, 206), headers=headers, stream=True, data_url=True
            )
        except NotFound:
            raise
        except SiteError as exc:
            last = exc
            continue
        return _iter(site, resp, image, offset, what)
    assert last is not None
    raise last


def _read_urls(site: ServiceSite, path: str, what: str) -> list[str]:
    svc = site.service()
    if svc.files is not None:
        return [svc.files + url_path(path)]
    return negotiate(site, path, "pullFromVoSpace", what)


def _iter(
    site: ServiceSite, resp: requests.Response, image: ImageRecord, offset: int, what: str
) -> Iterator[bytes]:
    """The bytes from ``offset``; a read cut part-way is resumed with Range. A whole
    read is checked against the Digest the service sent when the record carries no hash
    the caller could check it with."""
    url = resp.url
    pos = offset
    skip = offset if resp.status_code == 200 and offset else 0  # Range ignored
    whole = offset == 0
    digest = md5_from_digest(resp.headers.get("Digest")) if whole else None
    md5 = hashlib.md5(usedforsecurity=False) if digest else None
    stalls = 0
    try:
        while True:
            try:
                for chunk in resp.iter_content(chunk_size=CHUNK):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                    pos += len(chunk)
                    stalls = 0
                    if md5 is not None:
                        md5.update(chunk)
                    yield chunk
                break
            except (requests.RequestException, OSError) as exc:
                resp.close()
                stalls += 1
                if stalls > _RESUMES or not resp.headers.get("Accept-Ranges", "bytes"):
                    raise classify(exc, site.name, what) from exc
                log.info("download.resume", site=site.name, image_id=image.id, offset=pos)
                resp = site.call(
                    "GET",
                    url,
                    what,
                    ok=(200, 206),
                    headers={"Range": f"bytes={pos}-"},
                    stream=True,
                    data_url=True,
                )
                if resp.status_code == 200:  # the service ignored Range: skip what we have
                    skip = pos
                    pos = 0
    finally:
        resp.close()
    unchecked = not (image.hashes.get("md5") or image.hashes.get("sha512"))
    if md5 is not None and unchecked and md5.hexdigest() != digest:
        raise TransientError(
            f"{what}: the bytes read do not match the service's Digest", site=site.name
        )


def move(site: ServiceSite, src: str, dst: str, what: str) -> None:
    """MoveNode: an asynchronous transfer job (UWS), run and waited for."""
    svc = site.service()
    assert svc.transfers is not None
    body = transfer_xml(site.vos_uri(src), site.vos_uri(dst), [])
    resp = site.call(
        "POST",
        svc.transfers,
        f"{what}: move",
        ok=(200, 201, 303),
        data=body,
        headers={"Content-Type": "text/xml"},
        allow_redirects=False,
        retry=False,
    )
    job = resp.headers.get("Location")
    if not job:
        raise SiteError(f"{what}: the move job has no Location", site=site.name)
    job = urljoin(svc.transfers + "/", job)
    site.call(
        "POST",
        job + "/phase",
        f"{what}: run the move",
        ok=(200, 303),
        data={"PHASE": "RUN"},
        allow_redirects=False,
        retry=False,
    )
    deadline = time.monotonic() + max(site.cfg.timeout, 30.0)
    delay = 0.05
    while True:
        phase = (
            site.call("GET", job + "/phase", f"{what}: move")
            .content.decode("utf-8", "replace")
            .strip()
            .upper()
        )
        if phase == "COMPLETED":
            return
        if phase in ("ERROR", "ABORTED"):
            detail = ""
            with contextlib.suppress(SiteError):
                detail = fault_text(site.call("GET", job + "/error", what))
            raise SiteError(f"{what}: the move failed ({phase}) {detail}".strip(), site=site.name)
        if time.monotonic() > deadline:
            raise TransientError(f"{what}: the move is still {phase}", site=site.name)
        site.sleep(delay)
        delay = min(delay * 2, 1.0)
