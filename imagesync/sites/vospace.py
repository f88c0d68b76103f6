"""A VOSpace 2.1 service as a Site (CADC's vault or arc, or the lab's): a client of our own
over ``requests``.

CADC's ``vos``/``cadcutils`` packages are AGPL and are used only by the tests, to check that
what imagesync writes is what CADC's client reads and the other way round; this module follows
the IVOA standard as CADC serves it (``/work/shared/reference/vospace-facts.md``).

Finding the service: by its VOSI capabilities URL, or by looking its resource ID
(``ivo://cadc.nrc.ca/vault``, by default the container's) up in a registry of
``resourceID = capabilitiesURL`` lines, as CADC's clients do. The capabilities name the
``nodes``, ``sync`` and (optional) ``files`` and ``transfers`` endpoints; for each the interface
whose security method matches our credentials is taken (a bearer token, read from its file
whenever the file changes so that it can be rotated; an X.509 proxy certificate, certificate
and key in one PEM; or none).

Layout, readable by people and by ``vls``::

    vos://cadc.nrc.ca~vault/canfar/images/            the configured container
        centos7/                                      one container node per image name
            20240501T120000Z-1a2b3c4d.qcow2           one data node per version

An image's id is ``NAME/LEAF``. Provenance, formats and the image's own properties are node
properties under imagesync's URIs (``ivo://imagesync/image#sha512``, ``#origin``, ``#version``,
``#disk_format``, …; user properties as ``ivo://imagesync/property#KEY``); the md5 is the
service's own ``core#MD5``. A data node written by someone else (CANFAR's ``vmsave``, ``vcp``)
inside a name's container is an image of that name too: the store is a source as well.

Two-phase write: the data node is made with ``imagesync#state=uploading``, and where the
service offers ``transfers`` under the hidden name ``.LEAF.uploading`` (moved to ``LEAF`` on
publish, a server-side MoveNode); the bytes go to the endpoint a ``sync`` negotiation
(pushToVoSpace) names, trying each in turn, with a Content-Length (the size is known). The
site hashes nothing itself: ``finish()`` reports the md5 the service computed of what it
stored (the ``Digest: md5=`` it answers, else the node's ``core#MD5``), which the transfer
compares with the md5 of the bytes it read from the source, an end-to-end check of the stored
bytes; so ``capabilities.hashes`` is ``{"md5"}``. The sha512 (the image's identity) is the
transfer's, stored as a node property at publish. (Computing a second sha512 here, only to
report it, cost ~1.2 CPU s/GiB and checked nothing the service's md5 does not: see
bench/README.md.) Publishing moves the node and removes the mark; every failure deletes the
node, and a crash leftover still carries the mark, so recovery removes it.

With ``compress: zstd`` the data node holds one zstd frame (``sites/compress.py``; its leaf
ends in ``.zst``, so ``vcp`` and ``zstd -d`` give back the image), compressed in the upload's
thread while it streams and sent chunked (its length is not known before the end). The node
says so (``#compress=zstd``) and carries the uncompressed size (``#size``) beside the sha512 of
the uncompressed bytes; the service's ``core#length`` and ``core#MD5`` are the stored frame's,
never reported as the image's. There the upload thread hashes the frame (md5, checked against
the service's ``Digest``) and the image fed to the compressor (sha512, which ``finish()``
reports once the frame's md5 matched, so ``capabilities.hashes`` is ``{"sha512"}``). Reads
decompress while streaming (from an offset: from the frame's start).

Reads take the ``files`` shortcut where offered (else a pullFromVoSpace negotiation), ask for
``Range`` from an offset, and resume a read that was cut from where it stopped. Listings are
paginated with ``limit`` and ``uri``. A 503's ``Retry-After`` becomes the TransientError's hint;
idempotent requests (everything but the data PUT and the negotiations) are retried with the
shared policy, so a burst of 503s delays a pass instead of failing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin

import requests
import structlog

from imagesync.config.types import VOSpaceConfig
from imagesync.errors import Conflict, NotFound, SiteError, TransientError
from imagesync.hashing import MultiHasher
from imagesync.model import (
    PROP_STATE,
    STATE_UPLOADING,
    ImageRecord,
    NewImage,
    parse_time,
)
from imagesync.retry import RetryPolicy, call_with_retry
from imagesync.sites.base import Capabilities, SharedURL
from imagesync.sites.compress import SUFFIX, ZSTD, Compressor, decompressed
from imagesync.sites.directory import check_name
from imagesync.sites.upload import QueueBody, QueuedUpload
from imagesync.sites.vospace_share import share
from imagesync.sites.vosproto import (
    CORE,
    IMAGE,
    PROPERTY,
    SEC_ANON,
    SEC_CERT,
    SEC_TOKEN,
    Node,
    Service,
    Token,
    classify,
    classify_status,
    fault_text,
    leaf_for,
    md5_from_digest,
    node_xml,
    parse_capabilities,
    parse_endpoints,
    parse_node,
    quote_segment,
    split_id,
    transfer_xml,
)

log = structlog.get_logger("imagesync.vospace")

#: what ``finish()`` reports: the service's md5 of a plain node; for a compressed one (whose
#: md5 is the frame's) the sha512 of the image that went into the frame the service confirmed
HASHES = frozenset({"md5"})
HASHES_COMPRESSED = frozenset({"sha512"})
CHUNK = 1 << 20
PAGE = 500  # children per listing page
_RESUMES = 3  # a cut read is resumed this many times in a row without progress
_ATTRS = (
    "disk_format",
    "container_format",
    "min_disk",
    "min_ram",
    "visibility",
    "hidden",
    "compress",
    "size",
)
_FORMAT_OF_EXT = {".qcow2": "qcow2", ".img": "raw", ".raw": "raw", ".vmdk": "vmdk", ".iso": "iso"}
_HIDDEN = re.compile(r"^\.(.+)\.uploading$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")


# --------------------------------------------------------------------------- the upload


class _Body(QueueBody):
    """The data PUT's body (``QueueBody``), compressed on the way when ``compressor`` is
    given: then sent chunked (the frame's length is known only at its end) and hashed (``md5``
    of the frame sent, ``sha512`` of the image). A plain one is checked by the transfer
    against the service's md5, see the module's doc."""

    def __init__(self, size: int | None, compressor: Compressor | None = None) -> None:
        super().__init__(size)
        self.compressor = compressor
        #: of the frame sent (the service's Digest) and of the image fed to the compressor
        self.md5 = hashlib.md5(usedforsecurity=False) if compressor is not None else None
        # the image's sha512 in a thread of its own, beside zstd and the frame's md5 (ended
        # by the writer's finish or abort)
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
        site: VOSpaceSite,
        name: str,
        leaf: str,
        path: str,
        endpoints: list[str],
        size: int | None,
        compressor: Compressor | None = None,
    ) -> None:
        self.site = site
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
        hasher = self.body.sha512
        try:
            self._end()
            image_sha512 = hasher.hexdigests()["sha512"] if hasher is not None else None
        finally:
            if hasher is not None:  # whatever finish answers, no hashing thread outlives it
                hasher.close()
        resp = self.response
        assert resp is not None
        what = f"upload {self.image_id}"
        if resp.status_code >= 300:
            raise classify_status(resp, self.site.name, what)
        theirs = md5_from_digest(resp.headers.get("Digest"))
        node = self.site.node(self.path, what)
        if theirs is None:  # no Digest answered: the node's own md5 is the service's word
            theirs = self.site.md5_of(node)
        if self.body.md5 is None:
            # A plain node: the service's md5 of what it stored is the claim, compared by the
            # transfer with the md5 of what it read (none answered: nothing is claimed, so
            # the transfer reads the copy back).
            rec = self.site.record(self.name, node)
            return rec.with_(hashes={"md5": theirs} if theirs else {})
        assert image_sha512 is not None
        ours = self.body.md5.hexdigest()
        if theirs == ours:
            # The service holds exactly the frame made here of these bytes: their sha512 is
            # the image's. Kept on the node, so that a listing reports it before publish (and
            # vls shows it).
            props = {
                IMAGE + "sha512": image_sha512,
                IMAGE + "size": str(self.body.sent),
            }
            node = self.site.set_properties(self.path, props, what)
            return self.site.record(self.name, node)
        log.warning(
            "upload.digest_mismatch",
            site=self.site.name,
            image_id=self.image_id,
            sent=ours,
            stored=theirs,
        )
        # A compressed frame's md5 is no hash of the image: nothing is claimed, so the
        # transfer reads the copy back (and finds it damaged) and removes it.
        return self.site.record(self.name, node).with_(hashes={})

    def abort(self) -> None:
        self._wake(timeout=max(self.site.cfg.timeout, 5.0))
        if self.body.sha512 is not None:
            self.body.sha512.close()
        self.site.delete_quietly(self.path)


# --------------------------------------------------------------------------- the site


#: a busy VOSpace service answers 503 with Retry-After for a while: up to 6 retries of a
#: request, as CADC's own clients make, so that a burst delays a pass instead of failing it
SERVICE_RETRIES = RetryPolicy(attempts=7)


class VOSpaceSite:
    """A Site over one container of a VOSpace 2.1 service (core protocol + hiding)."""

    kind = "vospace"

    def __init__(
        self,
        name: str,
        cfg: VOSpaceConfig,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        compress: str | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        #: how new images are stored (None, or "zstd"); each node says how it was
        self.compress = compress
        self.policy = policy or SERVICE_RETRIES
        self.sleep = sleep
        self.container = cfg.container  # vos://authority~service/path
        self.root = "/" + self.container.removeprefix("vos://").split("/", 1)[1]
        self.session = requests.Session()
        self.session.trust_env = False  # proxies from the environment are not the service's
        self.session.verify = cfg.verify
        if cfg.certificate is not None:
            self.session.cert = str(cfg.certificate)
        self.token = Token(cfg.token_file) if cfg.token_file is not None else None
        self.security = (
            SEC_TOKEN if self.token else SEC_CERT if cfg.certificate is not None else SEC_ANON
        )
        self._service: Service | None = None
        self._lock = threading.Lock()
        self.capabilities = Capabilities.fill(
            self, hashes=HASHES if compress is None else HASHES_COMPRESSED
        )

    # -- HTTP -----------------------------------------------------------------------------
    def http(
        self, method: str, url: str, *, data_url: bool = False, **kw: Any
    ) -> requests.Response:
        """One request with our credentials; exceptions are requests'/socket's."""
        headers = dict(kw.pop("headers", None) or {})
        if self.token is not None:
            token = self.token.value(self.name)
            headers["Authorization"] = f"Bearer {token}"
            if not data_url:  # as CADC's client sends it to the web services
                headers["X-CADC-DelegationToken"] = token
        kw.setdefault("timeout", self.cfg.timeout)
        return self.session.request(method, url, headers=headers, **kw)

    def _call(
        self,
        method: str,
        url: str,
        what: str,
        *,
        ok: tuple[int, ...] = (200,),
        retry: bool = True,
        **kw: Any,
    ) -> requests.Response:
        """A request whose answer must be one of ``ok``; anything else is classified.
        Idempotent ones are retried on a transient failure with the shared policy."""

        def once() -> requests.Response:
            try:
                resp = self.http(method, url, **kw)
            except (SiteError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise classify(exc, self.name, what) from exc
            if resp.status_code not in ok:
                err = classify_status(resp, self.name, what)
                resp.close()
                raise err
            return resp

        if not retry:
            return once()
        try:
            return call_with_retry(once, self.policy, what=what, sleep=self.sleep)
        except TransientError as exc:
            # keep the service's last Retry-After: the caller's own retry honours it
            last = exc.__cause__ if isinstance(exc.__cause__, TransientError) else exc
            raise TransientError(str(exc), site=self.name, retry_after=last.retry_after) from exc

    # -- the service ------------------------------------------------------------------------
    def service(self) -> Service:
        """The service's endpoints: resolved once, on first use."""
        with self._lock:
            if self._service is None:
                self._service = self._resolve()
            return self._service

    def _resolve(self) -> Service:
        caps_url = self.cfg.capabilities_url or self._lookup(self.cfg.authority_resource_id)
        resp = self._call("GET", caps_url, f"read the capabilities at {caps_url}")
        try:
            return parse_capabilities(resp.content, caps_url, self.security)
        except (ET.ParseError, ValueError) as exc:
            raise SiteError(
                f"{caps_url} is not a VOSpace service's capabilities: {exc}", site=self.name
            ) from exc

    def _lookup(self, resource_id: str) -> str:
        registry = self.cfg.registry
        if "://" in registry:
            text = self._call("GET", registry, f"read the registry {registry}").text
        else:
            try:
                text = Path(registry).read_text()
            except OSError as exc:
                raise SiteError(
                    f"cannot read the registry {registry}: {exc.strerror}", site=self.name
                ) from exc
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.strip().startswith("#") and key.strip() == resource_id:
                return value.strip()
        raise SiteError(
            f"{resource_id} is not in the registry {registry}: set url: to the service's "
            "capabilities URL, or resource_id: to one the registry lists",
            site=self.name,
        )

    def vos_uri(self, path: str) -> str:
        authority = self.container.removeprefix("vos://").split("/", 1)[0]
        return f"vos://{authority}{path}"

    def node_url(self, path: str) -> str:
        return self.service().nodes + _url_path(path)

    def _image_path(self, name: str, leaf: str = "") -> str:
        return f"{self.root}/{name}" + (f"/{leaf}" if leaf else "")

    # -- nodes ----------------------------------------------------------------------------
    def node(
        self, path: str, what: str, *, limit: int | None = 0, start: str | None = None
    ) -> Node:
        params: dict[str, str] = {"detail": "max"}
        if limit is not None:
            params["limit"] = str(limit)
        if start is not None:
            params["uri"] = start
        resp = self._call("GET", self.node_url(path), what, params=params)
        try:
            return parse_node(ET.fromstring(resp.content))
        except ET.ParseError as exc:
            raise SiteError(
                f"{what}: the service sent a node that is not XML", site=self.name
            ) from exc

    def children(self, path: str, what: str) -> Iterator[Node]:
        """Every child of a container, page by page (``limit`` + ``uri``, which the page
        starts with: skipped when it repeats the previous page's last one)."""
        seen: set[str] = set()
        start: str | None = None
        while True:
            # a later page starts with the previous one's last child: ask for one more
            limit = PAGE if start is None else PAGE + 1
            page = self.node(path, what, limit=limit, start=start).children
            fresh = [c for c in page if c.uri not in seen]
            for child in fresh:
                seen.add(child.uri)
                yield child
            if not fresh or len(page) < limit:
                return
            start = page[-1].uri

    def set_properties(self, path: str, props: Mapping[str, str | None], what: str) -> Node:
        body = node_xml(self.vos_uri(path), "DataNode", props)
        self._call(
            "POST", self.node_url(path), what, data=body, headers={"Content-Type": "text/xml"}
        )
        return self.node(path, what)

    def _delete_node(self, path: str, what: str) -> bool:
        """Delete one node; False when it was not there."""
        try:
            self._call("DELETE", self.node_url(path), what, ok=(200, 202, 204))
        except NotFound:
            return False
        return True

    def delete_quietly(self, path: str) -> None:
        """Delete during clean-up: log and swallow failures (recovery finds the mark)."""
        try:
            self._delete_node(path, f"remove {path}")
        except SiteError as exc:
            log.warning("cleanup.delete_failed", site=self.name, path=path, error=str(exc))

    @staticmethod
    def md5_of(node: Node) -> str | None:
        value = node.properties.get(CORE + "MD5", "").lower().removeprefix("md5:")
        return value if _HEX32.match(value) else None

    # -- records --------------------------------------------------------------------------
    def record(self, name: str, node: Node) -> ImageRecord:
        p = node.properties
        leaf = node.leaf
        m = _HIDDEN.match(leaf)
        uploading_name = m is not None
        if m is not None:
            leaf = m.group(1)
        props: dict[str, str] = {}
        for uri, value in p.items():
            if uri.startswith(PROPERTY):
                props[unquote(uri[len(PROPERTY) :])] = value
            elif uri.startswith(IMAGE) and uri[len(IMAGE) :] not in _ATTRS:
                props["imagesync." + uri[len(IMAGE) :]] = value
        compressed = p.get(IMAGE + "compress") == ZSTD
        hashes: dict[str, str] = {}
        if (md5 := self.md5_of(node)) is not None and not compressed:
            hashes["md5"] = md5
        sha = p.get(IMAGE + "sha512", "").lower()
        if _HEX128.match(sha):
            hashes["sha512"] = sha
        in_progress = props.get(PROP_STATE) == STATE_UPLOADING
        status = "active"
        # an upload still under way has no hash yet (the service's md5 comes with the data)
        if node.busy or (in_progress and not hashes):
            status = "saving"
        created = (
            parse_time(p.get(CORE + "ctime"))
            or parse_time(p.get(CORE + "date"))
            or datetime.now(UTC)
        )
        plain = leaf.removesuffix(SUFFIX) if compressed else leaf
        suffix = "." + plain.rsplit(".", 1)[-1].lower() if "." in plain else ""
        size_prop = p.get(IMAGE + "size" if compressed else CORE + "length", "")
        disk_format = p.get(IMAGE + "disk_format") or _FORMAT_OF_EXT.get(suffix)
        return ImageRecord(
            site=self.name,
            id=f"{name}/{leaf}",
            name=name,
            status=status,
            created_at=created,
            updated_at=parse_time(p.get(CORE + "mtime")) or parse_time(p.get(CORE + "date")),
            size=int(size_prop) if size_prop.isdigit() else None,
            hashes=hashes,
            disk_format=disk_format,
            container_format=p.get(IMAGE + "container_format") or ("bare" if disk_format else None),
            min_disk=_int(p.get(IMAGE + "min_disk")),
            min_ram=_int(p.get(IMAGE + "min_ram")),
            properties=props,
            visibility=p.get(IMAGE + "visibility") or "private",
            hidden=uploading_name or in_progress or p.get(IMAGE + "hidden") == "true",
        )

    def _records(self, name: str, nodes: Iterable[Node]) -> Iterator[ImageRecord]:
        for node in nodes:
            if node.type != "DataNode":
                continue
            leaf = node.leaf
            if leaf.startswith(".") and not _HIDDEN.match(leaf):
                continue  # someone's hidden file, not an image
            yield self.record(name, node)

    # -- Site protocol ----------------------------------------------------------------------
    def check_connection(self) -> str:
        """Resolve the service and list (one child of) the container."""
        svc = self.service()
        try:
            self.node(self.root, f"list {self.container}", limit=1)
        except NotFound:
            raise SiteError(
                f"the container {self.container} does not exist: create it (vmkdir "
                f"{self.container})",
                site=self.name,
            ) from None
        auth = {SEC_TOKEN: "token", SEC_CERT: "certificate", SEC_ANON: "anonymous"}[self.security]
        return f"VOSpace at {svc.nodes} ({auth}); container {self.container} listed"

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        self.service()
        if name is not None:
            try:
                check_name(name)
            except SiteError:
                return []
            try:
                kids = list(self.children(self._image_path(name), f"list {name}"))
            except NotFound:
                self._require_root()
                return []
            return list(self._records(name, kids))
        out: list[ImageRecord] = []
        try:
            top = list(self.children(self.root, f"list {self.container}"))
        except NotFound:
            raise SiteError(
                f"the container {self.container} does not exist", site=self.name
            ) from None
        for child in top:
            if child.type != "ContainerNode" or child.leaf.startswith("."):
                continue
            try:
                kids = list(self.children(self._image_path(child.leaf), f"list {child.leaf}"))
            except NotFound:
                continue  # removed while we listed
            out.extend(self._records(child.leaf, kids))
        return out

    def _require_root(self) -> None:
        """An unreachable or missing container must never look like an empty one."""
        try:
            self.node(self.root, f"list {self.container}")
        except NotFound:
            raise SiteError(
                f"the container {self.container} does not exist", site=self.name
            ) from None

    def _locate(self, image_id: str, what: str) -> tuple[str, Node]:
        """(path, node) of an image: under its name, or still under its uploading name."""
        self.service()  # unreachable is a SiteError, never NotFound
        parts = split_id(image_id)
        if parts is None:
            raise NotFound(f"no image {image_id!r}", site=self.name)
        name, leaf = parts
        for path in (self._image_path(name, leaf), self._image_path(name, f".{leaf}.uploading")):
            try:
                return path, self.node(path, what)
            except NotFound:
                continue
        raise NotFound(f"no image {image_id}", site=self.name)

    def get_image(self, image_id: str) -> ImageRecord:
        _, node = self._locate(image_id, f"get image {image_id}")
        return self.record(image_id.split("/", 1)[0], node)

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        what = f"download {image.id}"
        path, node = self._locate(image.id, what)
        if node.properties.get(IMAGE + "compress") == ZSTD:
            # a frame is read from its start, whatever the offset (see sites/compress.py)
            size = self.record(image.name, node).size
            raw = self._open_raw(path, image, 0, what)
            return decompressed(raw, offset=offset, size=size, what=what, site=self.name)
        return self._open_raw(path, image, offset, what)

    def share_url(self, image: ImageRecord) -> SharedURL | None:
        """A pre-authorized URL of the image's bytes (sites/vospace_share.py), or None."""
        path, node = self._locate(image.id, f"share {image.id}")
        return share(self, image, path, node.properties.get(IMAGE + "compress") == ZSTD)

    def _open_raw(self, path: str, image: ImageRecord, offset: int, what: str) -> Iterator[bytes]:
        """The stored bytes from ``offset``, as the service holds them."""
        urls = self._read_urls(path, what)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        last: SiteError | None = None
        for url in urls:
            try:
                resp = self._call(
                    "GET", url, what, ok=(200, 206), headers=headers, stream=True, data_url=True
                )
            except NotFound:
                raise
            except SiteError as exc:
                last = exc
                continue
            return self._iter(resp, image, offset, what)
        assert last is not None
        raise last

    def _read_urls(self, path: str, what: str) -> list[str]:
        svc = self.service()
        if svc.files is not None:
            return [svc.files + _url_path(path)]
        return self._negotiate(path, "pullFromVoSpace", what)

    def _iter(
        self, resp: requests.Response, image: ImageRecord, offset: int, what: str
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
                        raise classify(exc, self.name, what) from exc
                    log.info("download.resume", site=self.name, image_id=image.id, offset=pos)
                    resp = self._call(
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
                f"{what}: the bytes read do not match the service's Digest", site=self.name
            )

    def _negotiate(self, path: str, direction: str, what: str) -> list[str]:
        """A ``sync`` transfer: POST the document, follow the service's redirects (CADC: 303
        to ``…/results/transferDetails``), return the endpoints in order."""
        svc = self.service()
        scheme = "https" if svc.sync.startswith("https") else "http"
        verb = "put" if direction == "pushToVoSpace" else "get"
        protos: list[tuple[str, str | None]] = []
        for s in (scheme, "https" if scheme == "http" else "http"):
            proto = f"{CORE}{s}{verb}"
            if self.security:
                protos.append((proto, self.security))
            protos.append((proto, None))
        body = transfer_xml(self.vos_uri(path), direction, protos)
        resp = self._call(
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
            raise SiteError(f"{what}: the transfer document is not XML", site=self.name) from exc
        if not endpoints:
            raise SiteError(f"{what}: the service offered no endpoint", site=self.name)
        # an endpoint may be relative to the document it came in
        return [urljoin(resp.url, e) for e in endpoints]

    def create(self, new: NewImage) -> VOSpaceWriter:
        name = check_name(new.name)
        svc = self.service()
        what = f"create image {name!r}"
        self._ensure_container(name, what)
        leaf = leaf_for(new, datetime.now(UTC))
        if self.compress == ZSTD:
            leaf += SUFFIX
        # hidden under a dot-name where the service can move it into place on publish;
        # otherwise at its final name, marked (and so hidden to imagesync) until then
        path = self._image_path(name, f".{leaf}.uploading" if svc.transfers else leaf)
        props: dict[str, str | None] = {
            IMAGE + "disk_format": new.disk_format,
            IMAGE + "container_format": new.container_format,
            IMAGE + "min_disk": str(new.min_disk),
            IMAGE + "min_ram": str(new.min_ram),
            IMAGE + "visibility": new.visibility,
        }
        props.update(_to_uris({**new.properties, PROP_STATE: STATE_UPLOADING}))
        if self.compress == ZSTD:
            props[IMAGE + "compress"] = ZSTD
        body = node_xml(
            self.vos_uri(path), "DataNode", {k: v for k, v in props.items() if v is not None}
        )
        self._call(
            "PUT",
            self.node_url(path),
            what,
            ok=(200, 201),
            data=body,
            headers={"Content-Type": "text/xml"},
        )
        try:
            endpoints = self._negotiate(path, "pushToVoSpace", what)
            compressor = (
                Compressor(new.size, what=f"upload {name}/{leaf}", site=self.name)
                if self.compress == ZSTD
                else None
            )
            return VOSpaceWriter(self, name, leaf, path, endpoints, new.size, compressor)
        except BaseException:
            self.delete_quietly(path)
            raise

    def _ensure_container(self, name: str, what: str) -> None:
        path = self._image_path(name)
        try:
            self.node(path, what)
            return
        except NotFound:
            pass
        self._require_root()
        with contextlib.suppress(Conflict):  # made by someone else meanwhile
            self._call(
                "PUT",
                self.node_url(path),
                what,
                ok=(200, 201),
                data=node_xml(self.vos_uri(path), "ContainerNode", {}),
                headers={"Content-Type": "text/xml"},
            )

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        what = f"publish {image_id}"
        path, node = self._locate(image_id, what)
        name, leaf = image_id.split("/", 1)
        final = self._image_path(name, leaf)
        if path != final:
            self._move(path, final, what)
        changes: dict[str, str | None] = {IMAGE + "state": None}
        changes.update(_to_uris(properties or {}))
        node = self.set_properties(final, changes, what)
        return self.record(name, node)

    def _move(self, src: str, dst: str, what: str) -> None:
        """MoveNode: an asynchronous transfer job (UWS), run and waited for."""
        svc = self.service()
        assert svc.transfers is not None
        body = transfer_xml(self.vos_uri(src), self.vos_uri(dst), [])
        resp = self._call(
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
            raise SiteError(f"{what}: the move job has no Location", site=self.name)
        job = urljoin(svc.transfers + "/", job)
        self._call(
            "POST",
            job + "/phase",
            f"{what}: run the move",
            ok=(200, 303),
            data={"PHASE": "RUN"},
            allow_redirects=False,
            retry=False,
        )
        deadline = time.monotonic() + max(self.cfg.timeout, 30.0)
        delay = 0.05
        while True:
            phase = (
                self._call("GET", job + "/phase", f"{what}: move")
                .content.decode("utf-8", "replace")
                .strip()
                .upper()
            )
            if phase == "COMPLETED":
                return
            if phase in ("ERROR", "ABORTED"):
                detail = ""
                with contextlib.suppress(SiteError):
                    detail = fault_text(self._call("GET", job + "/error", what))
                raise SiteError(
                    f"{what}: the move failed ({phase}) {detail}".strip(), site=self.name
                )
            if time.monotonic() > deadline:
                raise TransientError(f"{what}: the move is still {phase}", site=self.name)
            self.sleep(delay)
            delay = min(delay * 2, 1.0)

    def delete(self, image_id: str) -> None:
        self.service()
        parts = split_id(image_id)
        if parts is None:
            return
        name, leaf = parts
        what = f"delete {image_id}"
        for path in (self._image_path(name, leaf), self._image_path(name, f".{leaf}.uploading")):
            self._delete_node(path, what)
        self._prune(name)

    def _prune(self, name: str) -> None:
        """Remove a name's container once it holds nothing (as the directory store does)."""
        path = self._image_path(name)
        try:
            if not self.node(path, f"list {name}", limit=1).children:
                self._call("DELETE", self.node_url(path), f"remove {name}", ok=(200, 202, 204))
        except SiteError:
            pass  # not empty after all, already gone, or refused: harmless

    def hide(self, image_id: str) -> None:
        path, _ = self._locate(image_id, f"hide {image_id}")
        self.set_properties(path, {IMAGE + "hidden": "true"}, f"hide {image_id}")

    def close(self) -> None:
        self.session.close()


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _url_path(path: str) -> str:
    """``/a/b c`` → ``/a/b%20c``: each segment of a node's path quoted."""
    return "/" + "/".join(quote_segment(p) for p in path.strip("/").split("/"))


def _to_uris(properties: Mapping[str, str]) -> dict[str, str | None]:
    """imagesync's provenance (``imagesync.x``) → ``ivo://imagesync/image#x``; the image's own
    properties → ``ivo://imagesync/property#KEY``."""
    out: dict[str, str | None] = {}
    for key, value in properties.items():
        if key.startswith("imagesync."):
            out[IMAGE + key.removeprefix("imagesync.")] = value
        else:
            out[PROPERTY + quote_segment(key)] = value
    return out
