"""The VOSpace 2.1 protocol as CADC serves it, without the site: names (standards, property
URIs), node and transfer documents, VOSI capabilities, RFC 3230 digests, and how an HTTP
answer maps to imagesync's errors. Used by :mod:`imagesync.sites.vospace`.
"""

from __future__ import annotations

import base64
import binascii
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import requests

from imagesync.errors import AuthError, SiteError, TransientError
from imagesync.logs import redact
from imagesync.model import NewImage, parse_time
from imagesync.secrets import register_secret
from imagesync.sites.directory import check_name
from imagesync.sites.httpstatus import status_error

VOS = "http://www.ivoa.net/xml/VOSpace/v2.0"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
UWS = "http://www.ivoa.net/xml/UWS/v1.0"
CORE = "ivo://ivoa.net/vospace/core#"
#: imagesync's own property URIs: image attributes and provenance, and the image's properties
IMAGE = "ivo://imagesync/image#"
PROPERTY = "ivo://imagesync/property#"

STD_NODES = "ivo://ivoa.net/std/VOSpace/v2.0#nodes"
STD_SYNC = ("ivo://ivoa.net/std/VOSpace#sync-2.1", "ivo://ivoa.net/std/VOSpace/v2.0#sync")
STD_FILES = "ivo://ivoa.net/std/VOSpace#files-proto"
STD_TRANSFERS = "ivo://ivoa.net/std/VOSpace/v2.0#transfers"
SEC_TOKEN = "ivo://ivoa.net/sso#token"
SEC_CERT = "ivo://ivoa.net/sso#tls-with-certificate"
SEC_ANON = ""

_EXT = {"qcow2": ".qcow2", "raw": ".img", "vmdk": ".vmdk", "vdi": ".vdi", "iso": ".iso"}

ET.register_namespace("vos", VOS)
ET.register_namespace("xsi", XSI)


# --------------------------------------------------------------------------- small helpers


def md5_from_digest(header: str | None) -> str | None:
    """The md5 (hex) in an RFC 3230 ``Digest`` header (``md5=<base64>``), or None."""
    for part in (header or "").split(","):
        algo, _, value = part.strip().partition("=")
        if algo.strip().lower() == "md5" and value:
            try:
                raw = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
            return raw.hex() if len(raw) == 16 else None
    return None


def digest_header(md5_hex: str) -> str:
    """``md5=<base64 of the 16 raw bytes>`` (RFC 3230)."""
    return "md5=" + base64.b64encode(bytes.fromhex(md5_hex)).decode()


def fault_text(resp: requests.Response) -> str:
    """The first line of a VOSpace fault (``NodeNotFound …``), secret-free."""
    try:
        text = resp.text.strip().splitlines()[0] if resp.text.strip() else ""
    except (UnicodeDecodeError, IndexError):
        text = ""
    return redact(text)[:200]


def classify_status(resp: requests.Response, site: str, what: str) -> SiteError:
    """The error an HTTP answer means, in imagesync's hierarchy."""
    status = resp.status_code
    fault = fault_text(resp)
    detail = f": {fault}" if fault else ""
    refused = "check the token file or proxy certificate"
    err = status_error(status, site, what, refused=refused, detail=detail, response=resp)
    return err or SiteError(f"{what}: HTTP {status}{detail}", site=site)


def classify(exc: BaseException, site: str, what: str) -> SiteError:
    """Turn a requests (or socket) exception into imagesync's hierarchy."""
    if isinstance(exc, SiteError):
        return exc
    if isinstance(exc, requests.exceptions.SSLError):
        return SiteError(
            f"{what}: TLS failed: set verify: to the service's CA bundle, or check the "
            "proxy certificate",
            site=site,
        )
    if isinstance(
        exc,
        requests.ConnectionError
        | requests.Timeout
        | requests.exceptions.ChunkedEncodingError
        | ConnectionError
        | TimeoutError
        | OSError,
    ):
        return TransientError(f"{what}: connection failed: {type(exc).__name__}", site=site)
    return SiteError(f"{what}: {type(exc).__name__}: {redact(str(exc))[:200]}", site=site)


def quote_segment(text: str) -> str:
    return quote(text, safe="")


def leaf_for(new: NewImage, now: datetime) -> str:
    """A node name people can read: the version's time, a short unique part, the format's
    usual extension."""
    vtime = parse_time(new.properties.get("imagesync.version")) or now
    ext = _EXT.get((new.disk_format or "").lower(), ".img")
    return f"{vtime.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}{ext}"


def split_id(image_id: str) -> tuple[str, str] | None:
    name, sep, leaf = image_id.partition("/")
    if not sep or not name or not leaf or "/" in leaf or leaf.startswith("."):
        return None
    try:
        check_name(name)
    except SiteError:
        return None
    if leaf in (".", ".."):
        return None
    return name, leaf


# --------------------------------------------------------------------------- XML


@dataclass
class Node:
    """A node as the service described it."""

    uri: str
    type: str  # "ContainerNode", "DataNode", "LinkNode"
    properties: dict[str, str]
    busy: bool = False
    children: list[Node] = field(default_factory=list)

    @property
    def leaf(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


def parse_node(elem: ET.Element) -> Node:
    xsi_type = elem.get(f"{{{XSI}}}type", "")
    props: dict[str, str] = {}
    for p in elem.findall(f"{{{VOS}}}properties/{{{VOS}}}property"):
        uri = p.get("uri")
        if uri and p.get(f"{{{XSI}}}nil") != "true":
            props[uri] = (p.text or "").strip()
    children = [parse_node(c) for c in elem.findall(f"{{{VOS}}}nodes/{{{VOS}}}node")]
    return Node(
        uri=elem.get("uri", ""),
        type=xsi_type.rsplit(":", 1)[-1],
        properties=props,
        busy=elem.get("busy", "false") == "true",
        children=children,
    )


def node_xml(uri: str, kind: str, properties: Mapping[str, str | None]) -> bytes:
    """A node document: ``kind`` is ContainerNode or DataNode; a None value deletes the
    property (``xsi:nil``)."""
    root = ET.Element(f"{{{VOS}}}node", {"uri": uri, f"{{{XSI}}}type": f"vos:{kind}"})
    props = ET.SubElement(root, f"{{{VOS}}}properties")
    for key, value in properties.items():
        p = ET.SubElement(props, f"{{{VOS}}}property", {"uri": key})
        if value is None:
            p.set(f"{{{XSI}}}nil", "true")
        else:
            p.text = value
    if kind == "ContainerNode":
        ET.SubElement(root, f"{{{VOS}}}nodes")
    out: bytes = ET.tostring(root, xml_declaration=True, encoding="utf-8")
    return out


def transfer_xml(target: str, direction: str, protocols: Iterable[tuple[str, str | None]]) -> bytes:
    root = ET.Element(f"{{{VOS}}}transfer", {"version": "2.1"})
    ET.SubElement(root, f"{{{VOS}}}target").text = target
    ET.SubElement(root, f"{{{VOS}}}direction").text = direction
    for proto, security in protocols:
        p = ET.SubElement(root, f"{{{VOS}}}protocol", {"uri": proto})
        if security:
            ET.SubElement(p, f"{{{VOS}}}securityMethod", {"uri": security})
    if direction.startswith("vos://"):
        ET.SubElement(root, f"{{{VOS}}}keepBytes").text = "false"
    out: bytes = ET.tostring(root, xml_declaration=True, encoding="utf-8")
    return out


def parse_endpoints(body: bytes) -> list[str]:
    """The endpoints of a transfer document, in the service's order."""
    root = ET.fromstring(body)
    return [
        (e.text or "").strip() for e in root.iter(f"{{{VOS}}}endpoint") if (e.text or "").strip()
    ]


@dataclass(frozen=True)
class Service:
    """A VOSpace service's endpoints, as its capabilities name them."""

    capabilities_url: str
    nodes: str
    sync: str
    files: str | None = None
    transfers: str | None = None


def parse_capabilities(body: bytes, base: str, security: str) -> Service:
    """Pick, for each standard, the interface matching ``security`` (else the anonymous one,
    else the first). Elements are matched by local name: CADC leaves them unqualified."""
    root = ET.fromstring(body)
    found: dict[str, str] = {}
    for cap in root.iter():
        if cap.tag.rsplit("}", 1)[-1] != "capability":
            continue
        std = cap.get("standardID", "")
        choices: dict[str, str] = {}
        for iface in cap:
            if iface.tag.rsplit("}", 1)[-1] != "interface":
                continue
            url = next(
                ((c.text or "").strip() for c in iface if c.tag.rsplit("}", 1)[-1] == "accessURL"),
                "",
            )
            if not url:
                continue
            methods = [
                c.get("standardID", "")
                for c in iface
                if c.tag.rsplit("}", 1)[-1] == "securityMethod"
            ] or [SEC_ANON]
            for m in methods:
                choices.setdefault(m, url)
        if choices:
            found[std] = (
                choices.get(security) or choices.get(SEC_ANON) or next(iter(choices.values()))
            )
    nodes = found.get(STD_NODES)
    sync = next((found[s] for s in STD_SYNC if s in found), None)
    if nodes is None or sync is None:
        missing = [n for n, v in (("nodes", nodes), ("sync", sync)) if v is None]
        raise ValueError(f"the capabilities name no {' and no '.join(missing)} endpoint")
    return Service(
        capabilities_url=base,
        nodes=nodes.rstrip("/"),
        sync=sync,
        files=found.get(STD_FILES, "").rstrip("/") or None,
        transfers=found.get(STD_TRANSFERS),
    )


# --------------------------------------------------------------------------- credentials


class Token:
    """A bearer token read from its file, again whenever the file changes (rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._value = ""
        self._lock = threading.Lock()

    def value(self, site: str) -> str:
        try:
            st = self.path.stat()
            with self._lock:
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    text = self.path.read_text().strip()
                    register_secret(text)
                    self._value, self._stamp = text, stamp
                value = self._value
        except OSError as exc:
            raise AuthError(
                f"cannot read the token file {self.path}: {exc.strerror or exc}", site=site
            ) from exc
        if not value:
            raise AuthError(f"the token file {self.path} is empty", site=site)
        return value


def url_path(path: str) -> str:
    """``/a/b c`` → ``/a/b%20c``: each segment of a node's path quoted."""
    return "/" + "/".join(quote_segment(p) for p in path.strip("/").split("/"))
