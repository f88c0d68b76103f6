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
bytes; so ``capabilities.hashes`` is ``{"md5"}``. When the copy holds that md5 without
computing it (Glance's own, see ``transfer._vouched_md5``), the PUT carries it as ``Digest:
md5=``: the service refuses other bytes (412, an integrity failure). The sha512 (the image's
identity) is the transfer's, stored as a node property at publish. (Computing a second sha512
here, only to report it, cost ~1.2 CPU s/GiB and checked nothing the service's md5 does not: see
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

This module is the site (finding the service, nodes, listing, the Site protocol); beside it:
``vospace_records.py`` (node ↔ image), ``vospace_writer.py`` (the upload),
``vospace_transfer.py`` (negotiations, reads, MoveNode), ``vospace_share.py`` (pre-authorized
URLs) and ``vosproto.py`` (the protocol's XML, security methods and errors).
"""

from __future__ import annotations

import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import structlog

from imagesync.config.types import VOSpaceConfig
from imagesync.errors import Conflict, NotFound, SiteError, TransientError
from imagesync.model import PROP_STATE, STATE_UPLOADING, ImageRecord, NewImage
from imagesync.retry import RetryPolicy, call_with_retry
from imagesync.sites.base import Capabilities, SharedURL
from imagesync.sites.compress import SUFFIX, ZSTD, Compressor, decompressed
from imagesync.sites.directory import check_name
from imagesync.sites.vospace_records import record, records, to_uris
from imagesync.sites.vospace_share import share
from imagesync.sites.vospace_transfer import move, negotiate, open_raw
from imagesync.sites.vospace_writer import VOSpaceWriter
from imagesync.sites.vosproto import (
    IMAGE,
    SEC_ANON,
    SEC_CERT,
    SEC_TOKEN,
    Node,
    Service,
    Token,
    classify,
    classify_status,
    leaf_for,
    node_xml,
    parse_capabilities,
    parse_node,
    split_id,
    url_path,
)

log = structlog.get_logger("imagesync.vospace")

#: what ``finish()`` reports: the service's md5 of a plain node; for a compressed one (whose
#: md5 is the frame's) the sha512 of the image that went into the frame the service confirmed
HASHES = frozenset({"md5"})
HASHES_COMPRESSED = frozenset({"sha512"})
PAGE = 500  # children per listing page


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
        # a compressed upload hashes the image it compresses (the service sees only the frame)
        self.capabilities = Capabilities.fill(
            self,
            hashes=HASHES if compress is None else HASHES_COMPRESSED,
            hashes_handed=compress is not None,
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

    def call(
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
        resp = self.call("GET", caps_url, f"read the capabilities at {caps_url}")
        try:
            return parse_capabilities(resp.content, caps_url, self.security)
        except (ET.ParseError, ValueError) as exc:
            raise SiteError(
                f"{caps_url} is not a VOSpace service's capabilities: {exc}", site=self.name
            ) from exc

    def _lookup(self, resource_id: str) -> str:
        registry = self.cfg.registry
        if "://" in registry:
            text = self.call("GET", registry, f"read the registry {registry}").text
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
        return self.service().nodes + url_path(path)

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
        resp = self.call("GET", self.node_url(path), what, params=params)
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
        self.call(
            "POST", self.node_url(path), what, data=body, headers={"Content-Type": "text/xml"}
        )
        return self.node(path, what)

    def _delete_node(self, path: str, what: str) -> bool:
        """Delete one node; False when it was not there."""
        try:
            self.call("DELETE", self.node_url(path), what, ok=(200, 202, 204))
        except NotFound:
            return False
        return True

    def delete_quietly(self, path: str) -> None:
        """Delete during clean-up: log and swallow failures (recovery finds the mark)."""
        try:
            self._delete_node(path, f"remove {path}")
        except SiteError as exc:
            log.warning("cleanup.delete_failed", site=self.name, path=path, error=str(exc))

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
            return list(records(self.name, name, kids))
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
            out.extend(records(self.name, child.leaf, kids))
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
        return record(self.name, image_id.split("/", 1)[0], node)

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        what = f"download {image.id}"
        path, node = self._locate(image.id, what)
        if node.properties.get(IMAGE + "compress") == ZSTD:
            # a frame is read from its start, whatever the offset (see sites/compress.py)
            size = record(self.name, image.name, node).size
            raw = open_raw(self, path, image, 0, what)
            return decompressed(raw, offset=offset, size=size, what=what, site=self.name)
        return open_raw(self, path, image, offset, what)

    def share_url(self, image: ImageRecord) -> SharedURL | None:
        """A pre-authorized URL of the image's bytes (sites/vospace_share.py), or None."""
        path, node = self._locate(image.id, f"share {image.id}")
        return share(self, image, path, node.properties.get(IMAGE + "compress") == ZSTD)

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
        props.update(to_uris({**new.properties, PROP_STATE: STATE_UPLOADING}))
        if self.compress == ZSTD:
            props[IMAGE + "compress"] = ZSTD
        body = node_xml(
            self.vos_uri(path), "DataNode", {k: v for k, v in props.items() if v is not None}
        )
        self.call(
            "PUT",
            self.node_url(path),
            what,
            ok=(200, 201),
            data=body,
            headers={"Content-Type": "text/xml"},
        )
        try:
            endpoints = negotiate(self, path, "pushToVoSpace", what)
            compressor = (
                Compressor(new.size, what=f"upload {name}/{leaf}", site=self.name)
                if self.compress == ZSTD
                else None
            )
            # the md5 the bytes will have, where the copy holds it (Glance's own): sent as the
            # upload's Digest for the service to check (a frame's md5 is not the image's)
            md5 = new.md5 if compressor is None else None
            return VOSpaceWriter(self, name, leaf, path, endpoints, new.size, compressor, md5)
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
            self.call(
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
            move(self, path, final, what)
        changes: dict[str, str | None] = {IMAGE + "state": None}
        changes.update(to_uris(properties or {}))
        node = self.set_properties(final, changes, what)
        return record(self.name, name, node)

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
                self.call("DELETE", self.node_url(path), f"remove {name}", ok=(200, 202, 204))
        except SiteError:
            pass  # not empty after all, already gone, or refused: harmless

    def hide(self, image_id: str) -> None:
        path, _ = self._locate(image_id, f"hide {image_id}")
        self.set_properties(path, {IMAGE + "hidden": "true"}, f"hide {image_id}")

    def close(self) -> None:
        self.session.close()
