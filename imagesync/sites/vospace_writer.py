"""A VOSpace store's upload (``sites/vospace.py``'s ``create``): one data PUT fed by the
transfer's chunks through a queue, to the endpoints a ``pushToVoSpace`` negotiation named,
tried in turn until one takes the body.

``finish()`` reports what the service says it stored: for a plain node the md5 it computed (its
``Digest``, else the node's ``core#MD5``), which the transfer compares with the md5 of what it read
(when the copy holds that md5 already, the source's own, it is sent as the PUT's ``Digest: md5=``
too, and a 412 is an integrity failure); for a compressed one (``compress: zstd``) the md5 of the
frame sent is checked against the service's, and only then the sha512 of the image fed to the
compressor is claimed (and kept on the node). ``abort()`` deletes the node: a crash leaves the
upload mark, which recovery finds.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol

import requests
import structlog

from imagesync.config.types import VOSpaceConfig
from imagesync.errors import IntegrityError, SiteError, TransientError
from imagesync.hashing import MultiHasher
from imagesync.model import ImageRecord
from imagesync.sites.compress import Compressor
from imagesync.sites.upload import QueueBody, QueuedUpload
from imagesync.sites.vospace_records import md5_of, record
from imagesync.sites.vosproto import (
    IMAGE,
    Node,
    classify,
    classify_status,
    digest_header,
    md5_from_digest,
)

log = structlog.get_logger("imagesync.vospace")


class WriterSite(Protocol):
    """What an upload needs of its site; ``VOSpaceSite`` is one. A protocol, so that this
    module, which ``vospace`` imports, does not import ``vospace`` back."""

    name: str
    cfg: VOSpaceConfig

    def http(
        self, method: str, url: str, *, data_url: bool = False, **kw: Any
    ) -> requests.Response: ...
    def node(
        self, path: str, what: str, *, limit: int | None = 0, start: str | None = None
    ) -> Node: ...
    def set_properties(self, path: str, props: Mapping[str, str | None], what: str) -> Node: ...
    def delete_quietly(self, path: str) -> None: ...


class _Body(QueueBody):
    """The data PUT's body (``QueueBody``), compressed on the way when ``compressor`` is
    given: then sent chunked (the frame's length is known only at its end) and hashed (``md5``
    of the frame sent, ``sha512`` of the image). A plain one is checked by the transfer
    against the service's md5, see the module's doc."""

    def __init__(self, size: int | None, compressor: Compressor | None = None) -> None:
        super().__init__(size)
        self.compressor = compressor
        # The md5 of the frame sent (the service's Digest) and the sha512 of the image fed to
        # the compressor, each in a thread of its own beside zstd (ended by the writer's
        # finish or abort): hashed in the thread that compresses and sends, the frame's md5
        # alone held a 1 GB compressed push to 0.86-0.88x a plain one (bench_vospace).
        self.md5 = MultiHasher(["md5"]) if compressor is not None else None
        self.sha512 = MultiHasher(["sha512"]) if compressor is not None else None

    def __len__(self) -> int:
        return 0 if self.compressor is not None else super().__len__()

    def transform(self, chunk: bytes) -> bytes:
        if self.compressor is None or self.md5 is None or self.sha512 is None:
            return chunk
        self.sha512.update(chunk)
        frame = self.compressor.compress(chunk)
        self.md5.update(frame)  # hashed as sent: what the service's Digest must match
        return frame

    def tail(self) -> bytes:
        if self.compressor is None or self.md5 is None:
            return b""
        end = self.compressor.flush()
        self.md5.update(end)
        return end


class VOSpaceWriter(QueuedUpload):
    """One upload: ``write`` feeds a thread that PUTs to the negotiated endpoints."""

    body: _Body

    def __init__(
        self,
        site: WriterSite,
        name: str,
        leaf: str,
        path: str,
        endpoints: list[str],
        size: int | None,
        compressor: Compressor | None = None,
        md5: str | None = None,
    ) -> None:
        self.site = site
        #: the md5 the bytes sent must have (plain uploads): sent as ``Digest: md5=``
        self.md5 = md5
        self.name = name
        self.leaf = leaf
        self.path = path  # where the node is while uploading
        self.endpoints = endpoints
        self.body = _Body(size, compressor)
        self.response: requests.Response | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, daemon=True, name=f"upload-{site.name}-{leaf[:24]}"
        )
        self.thread.start()

    @property
    def image_id(self) -> str:
        return f"{self.name}/{self.leaf}"

    @property
    def stored_size(self) -> int:
        """Bytes sent to the service so far: the stored frame's size once finished."""
        c = self.body.compressor
        return c.stored_size if c is not None else self.body.sent

    def _run(self) -> None:
        headers = {"Content-Type": "application/octet-stream"}
        if self.md5 is not None:  # RFC 3230: the service refuses other bytes (412)
            headers["Digest"] = digest_header(self.md5)
        for i, url in enumerate(self.endpoints):
            try:
                resp = self.site.http("PUT", url, data=self.body, headers=headers, data_url=True)
            except BaseException as exc:
                if not self.body.started and i + 1 < len(self.endpoints):
                    log.info("upload.next_endpoint", site=self.site.name, error=type(exc).__name__)
                    continue  # nothing sent yet: the next endpoint may answer
                self.error = exc
                return
            if resp.status_code >= 400 and not self.body.started and i + 1 < len(self.endpoints):
                continue
            self.response = resp
            return

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise classify(self.error, self.site.name, f"upload {self.image_id}")

    def _closed(self) -> SiteError:
        return TransientError(
            f"upload {self.image_id}: the service answered before the data was sent"
            + (f" ({self.response.status_code})" if self.response is not None else ""),
            site=self.site.name,
        )

    def write(self, chunk: bytes) -> None:
        self._put(chunk)

    def finish(self) -> ImageRecord:
        hasher, frame_hasher = self.body.sha512, self.body.md5
        try:
            self._end()
            image_sha512 = hasher.hexdigests()["sha512"] if hasher is not None else None
            ours = frame_hasher.hexdigests()["md5"] if frame_hasher is not None else None
        finally:
            for h in (hasher, frame_hasher):  # whatever finish answers, no thread outlives it
                if h is not None:
                    h.close()
        resp = self.response
        assert resp is not None
        what = f"upload {self.image_id}"
        if resp.status_code == 412 and self.md5 is not None:
            # The service's md5 of what it received is not the md5 the bytes read have: damaged
            # on the way, or the source's md5 is not of the bytes it served. Not stored; the
            # transfer deletes the node.
            raise IntegrityError(
                f"{self.site.name}: {what}: the service refused the bytes (412): their md5 "
                f"is not the source's {self.md5}",
            )
        if resp.status_code >= 300:
            raise classify_status(resp, self.site.name, what)
        theirs = md5_from_digest(resp.headers.get("Digest"))
        node = self.site.node(self.path, what)
        if theirs is None:  # no Digest answered: the node's own md5 is the service's word
            theirs = md5_of(node)
        if ours is None:
            # A plain node: the service's md5 of what it stored is the claim, compared by the
            # transfer with the md5 of what it read (none answered: nothing is claimed, so
            # the transfer reads the copy back).
            rec = record(self.site.name, self.name, node)
            return rec.with_(hashes={"md5": theirs} if theirs else {})
        assert image_sha512 is not None
        if theirs == ours:
            # The service holds exactly the frame made here of these bytes: their sha512 is
            # the image's. Kept on the node, so that a listing reports it before publish (and
            # vls shows it).
            props = {
                IMAGE + "sha512": image_sha512,
                IMAGE + "size": str(self.body.sent),
            }
            node = self.site.set_properties(self.path, props, what)
            return record(self.site.name, self.name, node)
        log.warning(
            "upload.digest_mismatch",
            site=self.site.name,
            image_id=self.image_id,
            sent=ours,
            stored=theirs,
        )
        # A compressed frame's md5 is no hash of the image: nothing is claimed, so the
        # transfer reads the copy back (and finds it damaged) and removes it.
        return record(self.site.name, self.name, node).with_(hashes={})

    def abort(self) -> None:
        self._wake(timeout=max(self.site.cfg.timeout, 5.0))
        for h in (self.body.sha512, self.body.md5):
            if h is not None:
                h.close()
        self.site.delete_quietly(self.path)
