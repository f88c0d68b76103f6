"""A tiny in-test VOSpace 2.1 service (WSGI, served on loopback by wsgiref), for the VOSpace
site's fast tests: enough of the standard as CADC serves it (capabilities, nodes with
``limit``/``uri`` pages, ``sync`` with a 303 to the transfer details, data endpoints with
``Digest`` and ``Range``, ``files``, a ``transfers`` MoveNode job) and a few faults.

It is not the lab's service (``imagesync/lab/vospace``), which the integration tests use; it
keeps everything in memory and is as small as the tests allow.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, quote, unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

VOS = "http://www.ivoa.net/xml/VOSpace/v2.0"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
CORE = "ivo://ivoa.net/vospace/core#"
AUTHORITY = "example.org~store"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass
class StubNode:
    kind: str  # ContainerNode | DataNode
    props: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    date: str = ""


@dataclass
class StubFaults:
    """Faults to inject; counts go down as they fire."""

    unavailable: int = 0  # answer this many requests 503 with Retry-After
    retry_after: str = "0"
    wrong_digest: bool = False  # answer uploads with a Digest of other bytes
    no_digest: bool = False  # answer uploads without a Digest (the node's core#MD5 tells)
    flip_upload: bool = False  # a byte of an upload arrives flipped (damaged on the way)
    cut_read_after: int | None = None  # close a data GET after this many bytes …
    cut_reads: int = 0  # … this many times


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def _digest(data: bytes | bytearray) -> str:
    return "md5=" + base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class StubVOSpace:
    """The service: ``app`` is the WSGI application; ``nodes`` maps paths to nodes."""

    def __init__(self, *, transfers: bool = True, files: bool = True, token: str | None = None):
        self.transfers = transfers
        self.files = files
        self.token = token
        self.faults = StubFaults()
        self.nodes: dict[str, StubNode] = {"": StubNode("ContainerNode", date=_now())}
        self.requests: list[tuple[str, str]] = []
        #: each data PUT's ``Digest`` header (None: sent without one)
        self.put_digests: list[str | None] = []
        self.jobs: dict[str, tuple[str, str]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.base = ""

    # -- helpers --------------------------------------------------------------------------
    def _children(self, path: str) -> list[str]:
        prefix = path + "/" if path else ""
        return sorted(
            p for p in self.nodes if p.startswith(prefix) and p and "/" not in p[len(prefix) :]
        )

    def _uri(self, path: str) -> str:
        return f"vos://{AUTHORITY}/{path}"

    def _node_elem(self, path: str, parent: ET.Element | None = None) -> ET.Element:
        n = self.nodes[path]
        attrs = {"uri": self._uri(path), f"{{{XSI}}}type": f"vos:{n.kind}"}
        elem = (
            ET.Element(f"{{{VOS}}}node", attrs)
            if parent is None
            else ET.SubElement(parent, f"{{{VOS}}}node", attrs)
        )
        props = ET.SubElement(elem, f"{{{VOS}}}properties")
        shown = dict(n.props)
        shown[CORE + "date"] = n.date
        if n.kind == "DataNode":
            shown[CORE + "length"] = str(len(n.data))
            shown[CORE + "MD5"] = hashlib.md5(n.data, usedforsecurity=False).hexdigest()
        for k, v in shown.items():
            ET.SubElement(props, f"{{{VOS}}}property", {"uri": k}).text = v
        return elem

    def _path_of_uri(self, uri: str) -> str:
        m = re.match(r"vos://[^/]+[~!][^/]+/?(.*)", uri)
        assert m, uri
        return m.group(1).strip("/")

    # -- WSGI -----------------------------------------------------------------------------
    def app(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = unquote(environ.get("PATH_INFO", ""))
        query = parse_qs(environ.get("QUERY_STRING", ""))
        self.requests.append((method, path))
        if self.faults.unavailable > 0:
            self.faults.unavailable -= 1
            return self._answer(
                start,
                "503 Service Unavailable",
                b"busy",
                [("Retry-After", self.faults.retry_after)],
            )
        authorized = environ.get("HTTP_AUTHORIZATION") == f"Bearer {self.token}"
        if self.token is not None and path != "/capabilities" and not authorized:
            return self._answer(start, "401 Unauthorized", b"NotAuthenticated")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body_in = environ["wsgi.input"]
        if path == "/capabilities":
            return self._answer(
                start, "200 OK", self._capabilities(), [("Content-Type", "text/xml")]
            )
        if path.startswith("/nodes"):
            return self._nodes(
                method, path[len("/nodes") :].strip("/"), query, body_in, length, start
            )
        if path == "/sync" and method == "POST":
            job = str(next(self._ids))
            doc = ET.fromstring(body_in.read(length))
            target = self._path_of_uri(doc.findtext(f"{{{VOS}}}target") or "")
            direction = doc.findtext(f"{{{VOS}}}direction") or ""
            self.jobs[job] = (target, direction)
            return self._answer(
                start,
                "303 See Other",
                b"",
                [("Location", f"{self.base}/sync/{job}/results/transferDetails")],
            )
        m = re.fullmatch(r"/sync/(\d+)/results/transferDetails", path)
        if m:
            target, direction = self.jobs[m.group(1)]
            return self._answer(start, "200 OK", self._details(target, direction))
        m = re.fullmatch(r"/transfers(?:/(\d+)(/phase)?)?", path)
        if m and self.transfers:
            return self._transfers(method, m.group(1), bool(m.group(2)), body_in, length, start)
        if path.startswith("/data/"):
            return self._data(method, path[len("/data/") :], environ, body_in, length, start)
        if path.startswith("/files/") and self.files:
            return self._data("GET", path[len("/files/") :], environ, body_in, 0, start)
        return self._answer(start, "404 Not Found", b"NotFound")

    def _answer(
        self,
        start: StartResponse,
        status: str,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> list[bytes]:
        start(status, [("Content-Length", str(len(body))), *(headers or [])])
        return [body]

    def _capabilities(self) -> bytes:
        caps = [
            ("ivo://ivoa.net/std/VOSI#availability", "/availability"),
            ("ivo://ivoa.net/std/VOSpace/v2.0#nodes", "/nodes"),
            ("ivo://ivoa.net/std/VOSpace#sync-2.1", "/sync"),
        ]
        if self.files:
            caps.append(("ivo://ivoa.net/std/VOSpace#files-proto", "/files"))
        if self.transfers:
            caps.append(("ivo://ivoa.net/std/VOSpace/v2.0#transfers", "/transfers"))
        out = [
            '<?xml version="1.0"?><vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0"'
            ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        ]
        for std, url in caps:
            out.append(
                f'<capability standardID="{std}"><interface xsi:type="vs:ParamHTTP">'
                f'<accessURL use="base">{self.base}{url}</accessURL><securityMethod/>'
                '<securityMethod standardID="ivo://ivoa.net/sso#token"/></interface></capability>'
            )
        out.append("</vosi:capabilities>")
        return "".join(out).encode()

    def _details(self, target: str, direction: str) -> bytes:
        proto = "httpput" if direction == "pushToVoSpace" else "httpget"
        return (
            f'<vos:transfer xmlns:vos="{VOS}" version="2.1">'
            f"<vos:target>{self._uri(target)}</vos:target>"
            f"<vos:direction>{direction}</vos:direction>"
            f'<vos:protocol uri="{CORE}{proto}"><vos:endpoint>{self.base}/data/{quote(target)}'
            "</vos:endpoint></vos:protocol></vos:transfer>"
        ).encode()

    def _get_node(
        self, path: str, query: dict[str, list[str]], start: StartResponse
    ) -> list[bytes]:
        if path not in self.nodes:
            return self._answer(start, "404 Not Found", b"NodeNotFound " + path.encode())
        elem = self._node_elem(path)
        if self.nodes[path].kind == "ContainerNode":
            kids = self._children(path)
            if "uri" in query:
                first = self._path_of_uri(query["uri"][0])
                kids = [k for k in kids if k >= first]
            if "limit" in query:
                kids = kids[: int(query["limit"][0])]
            holder = ET.SubElement(elem, f"{{{VOS}}}nodes")
            for k in kids:
                self._node_elem(k, holder)
        return self._answer(start, "200 OK", ET.tostring(elem), [("Content-Type", "text/xml")])

    def _nodes(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        body_in: Any,
        length: int,
        start: StartResponse,
    ) -> list[bytes]:
        with self._lock:
            if method == "GET":
                return self._get_node(path, query, start)
            if method == "PUT":
                doc = ET.fromstring(body_in.read(length))
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                if path in self.nodes:
                    return self._answer(start, "409 Conflict", b"DuplicateNode")
                if parent not in self.nodes:
                    return self._answer(start, "404 Not Found", b"ContainerNotFound")
                kind = doc.get(f"{{{XSI}}}type", "").split(":")[-1]
                props = {
                    p.get("uri", ""): p.text or ""
                    for p in doc.iter(f"{{{VOS}}}property")
                    if not p.get("uri", "").startswith(CORE)
                }
                self.nodes[path] = StubNode(kind, props, date=_now())
                return self._answer(start, "201 Created", ET.tostring(self._node_elem(path)))
            if method == "POST":
                if path not in self.nodes:
                    return self._answer(start, "404 Not Found", b"NodeNotFound")
                doc = ET.fromstring(body_in.read(length))
                node = self.nodes[path]
                for p in doc.iter(f"{{{VOS}}}property"):
                    uri = p.get("uri", "")
                    if uri.startswith(CORE):
                        continue
                    if p.get(f"{{{XSI}}}nil") == "true":
                        node.props.pop(uri, None)
                    else:
                        node.props[uri] = p.text or ""
                node.date = _now()
                return self._answer(start, "200 OK", ET.tostring(self._node_elem(path)))
            if method == "DELETE":
                if path not in self.nodes:
                    return self._answer(start, "404 Not Found", b"NodeNotFound")
                if self._children(path):
                    return self._answer(start, "400 Bad Request", b"ContainerNotEmpty")
                del self.nodes[path]
                return self._answer(start, "200 OK", b"")
        return self._answer(start, "405 Method Not Allowed", b"")

    def _transfers(
        self,
        method: str,
        job: str | None,
        phase: bool,
        body_in: Any,
        length: int,
        start: StartResponse,
    ) -> list[bytes]:
        if job is None and method == "POST":
            doc = ET.fromstring(body_in.read(length))
            new = str(next(self._ids))
            self.jobs[new] = (
                self._path_of_uri(doc.findtext(f"{{{VOS}}}target") or ""),
                self._path_of_uri(doc.findtext(f"{{{VOS}}}direction") or ""),
            )
            return self._answer(
                start, "303 See Other", b"", [("Location", f"{self.base}/transfers/{new}")]
            )
        if job is not None and phase and method == "POST":
            src, dst = self.jobs[job]
            with self._lock:
                if src in self.nodes and dst not in self.nodes:
                    self.nodes[dst] = self.nodes.pop(src)
                    self.jobs[job] = ("", "COMPLETED")
                else:
                    self.jobs[job] = ("", "ERROR")
            return self._answer(
                start, "303 See Other", b"", [("Location", f"{self.base}/transfers/{job}")]
            )
        if job is not None and phase:
            return self._answer(start, "200 OK", self.jobs[job][1].encode())
        return self._answer(start, "404 Not Found", b"")

    def _data(
        self,
        method: str,
        path: str,
        environ: dict[str, Any],
        body_in: Any,
        length: int,
        start: StartResponse,
    ) -> Iterable[bytes]:
        node = self.nodes.get(path)
        if node is None or node.kind != "DataNode":
            return self._answer(start, "404 Not Found", b"NodeNotFound")
        if method == "PUT":
            data = bytearray()
            if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
                _read_chunked(body_in, data)  # a compressed upload's length is not known
            left = length
            while left:
                piece = body_in.read(min(left, 1 << 16))
                if not piece:
                    break
                data.extend(piece)
                left -= len(piece)
            if self.faults.flip_upload and data:
                data[len(data) // 2] ^= 1
            claimed = environ.get("HTTP_DIGEST", "")
            self.put_digests.append(claimed or None)
            if claimed.startswith("md5=") and claimed != _digest(data):
                # RFC 3230, as CADC's services: other bytes than the Digest says are refused
                return self._answer(start, "412 Precondition Failed", b"PreconditionFailed")
            digest = _digest(data + b"x" if self.faults.wrong_digest else data)
            node.data = data
            node.date = _now()
            headers = [] if self.faults.no_digest else [("Digest", digest)]
            return self._answer(start, "201 Created", b"", headers)
        body = bytes(node.data)
        m = re.fullmatch(r"bytes=(\d+)-", environ.get("HTTP_RANGE", ""))
        offset = int(m.group(1)) if m else 0
        status = "206 Partial Content" if m else "200 OK"
        headers = [
            ("Content-Length", str(len(body) - offset)),
            ("Digest", _digest(body)),
            ("Accept-Ranges", "bytes"),
            ("Content-Disposition", f'inline; filename="{path.rsplit("/", 1)[-1]}"'),
        ]
        if m:
            headers.append(("Content-Range", f"bytes {offset}-{len(body) - 1}/{len(body)}"))
        start(status, headers)
        return self._body(body[offset:])

    def _body(self, data: bytes) -> Iterator[bytes]:
        f = self.faults
        cut = f.cut_read_after if f.cut_reads > 0 else None
        if cut is not None:
            f.cut_reads -= 1
        for i in range(0, len(data), 65536):
            piece = data[i : i + 65536]
            if cut is not None and i + len(piece) > cut:
                yield piece[: cut - i]
                raise ConnectionResetError("cut by the stub")
            yield piece


class _Threading(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _read_chunked(body_in: Any, data: bytearray) -> None:
    """A chunked request body (wsgiref hands it over undecoded)."""
    while True:
        size = int(body_in.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while body_in.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        data.extend(body_in.read(size))
        body_in.readline()


class StubServer:
    """Serve a :class:`StubVOSpace` on a free loopback port until ``close()``."""

    def __init__(self, service: StubVOSpace) -> None:
        self.service = service
        self.httpd = make_server("127.0.0.1", 0, service.app, _Threading, _Quiet)
        self.port = self.httpd.server_address[1]
        service.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def capabilities_url(self) -> str:
        return f"{self.service.base}/capabilities"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
