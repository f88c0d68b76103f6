"""The lab VOSpace 2.1 service: a WSGI application, streaming in both directions.

Endpoints (under the service's base URL, ``{base}``)::

    GET  /capabilities /availability          VOSI (always anonymous)
    GET|PUT|POST|DELETE /nodes/{path}         nodes: read (limit, uri), create, set props, delete
    POST /sync                                 negotiation → 303 {job}/results/transferDetails
    GET  /transfers/{job}[/phase|/error|/results/transferDetails]
    POST /transfers, POST /transfers/{job}/phase   async MoveNode (keepBytes=false)
    HEAD|GET|PUT /data/{path}                  the bytes; Digest: md5=<base64> on every answer
    HEAD|GET /files/{path}                     the files-proto shortcut (200 with the bytes)

Uploads are read from ``wsgi.input`` a chunk at a time while hashed, into a new blob that
replaces the node's bytes only once complete and verified (``Digest`` mismatch → 412);
downloads are iterators over the file (``Range`` → 206). What CADC's ``vos`` client relies on is
written down in ``shared/reference/vos-client-recipe.md``; comments here name the quirks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from imagesync.lab.vospace import faults as faultmod
from imagesync.lab.vospace import storage, xmldoc
from imagesync.lab.vospace.storage import Invalid, NotFound, Store, StoreError

CHUNK = 1024 * 1024
# An upload with a Content-Length is read 64 KiB at a time, not 1 MiB (each piece then stays
# in the CPU's cache from the socket to md5 to the file, presumably). With 1 MiB reads it used
# 3.3 CPU s per GiB against 2.4 for the same bytes sent chunked (read as they come, through
# uwsgi.chunked_read); with 64 KiB reads, 2.3 (bench/README.md, bench_vospace.py).
INPUT_CHUNK = 64 * 1024
MAX_XML = 1024 * 1024  # node and transfer documents are small: refuse anything bigger
CONFIG_ENV = "IMAGESYNC_VOSPACE_CONFIG"
CONFIG_FILE = "service.json"

StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class ServiceConfig:
    """How one service runs. ``directory`` holds its data, its config and its fault file."""

    directory: Path
    base_url: str  # what clients reach it as, e.g. http://127.0.0.1:PORT
    authority: str = (
        "imagesync.lab~store"  # vos://AUTHORITY/path; resource ivo://imagesync.lab/store
    )
    token: str | None = None  # accepted as "Authorization: Bearer <token>"
    auth_required: bool = True  # without credentials: 401 (else anonymous may do anything)
    #: TLS with client certificates: a verified certificate counts as authenticated
    client_certs: bool = False
    transfers: bool = True  # offer the async transfers capability (MoveNode)

    @property
    def resource_id(self) -> str:
        host, _, name = self.authority.replace("!", "~").partition("~")
        return f"ivo://{host}/{name}"

    def save(self) -> Path:
        path = self.directory / CONFIG_FILE
        raw = {**asdict(self), "directory": str(self.directory)}
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the token
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(raw, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> ServiceConfig:
        raw = json.loads(path.read_text())
        raw["directory"] = Path(raw["directory"])
        return cls(**raw)


class HTTPError(Exception):
    def __init__(self, status: int, text: str, headers: Headers | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or []


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Request Entity Too Large",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _status(code: int) -> str:
    return f"{code} {_REASONS.get(code, 'Status')}"


def md5_digest(hex_md5: str) -> str:
    """RFC 3230 ``Digest`` value: ``md5=`` and the base64 of the 16 raw bytes."""
    return "md5=" + base64.b64encode(bytes.fromhex(hex_md5)).decode()


def _parse_digest(header: str) -> str | None:
    """The md5 (hex) named by a ``Digest`` header, or None if it names none."""
    for part in header.split(","):
        algo, _, value = part.strip().partition("=")
        if algo.strip().lower() == "md5" and value:
            try:
                return base64.b64decode(value.strip(), validate=True).hex()
            except ValueError:
                raise HTTPError(400, "InvalidArgument malformed md5 Digest") from None
    return None


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str, length: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single-range ``Range`` header; None to serve it whole."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # several ranges or another unit: RFC 9110 lets us send the whole thing
    if not m.group(1):
        suffix = int(m.group(2))
        if suffix == 0:
            raise HTTPError(416, "range not satisfiable", [("Content-Range", f"bytes */{length}")])
        return max(0, length - suffix), length - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else length - 1
    if first >= length or last < first:
        raise HTTPError(416, "range not satisfiable", [("Content-Range", f"bytes */{length}")])
    return first, min(last, length - 1)


class VOSpaceApp:
    """The WSGI application (``VOSpaceApp(config)`` is callable as ``app(environ, start)``)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.base = config.base_url.rstrip("/")
        self.store = Store(config.directory / "data")
        self._authority = config.authority.replace("!", "~")

    # ---- entry

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"].upper()
        path = environ.get("PATH_INFO", "") or "/"
        try:
            data = path.startswith(("/data/", "/files/"))
            found = faultmod.take(self.config.directory, method, path, data=data)
            if "unavailable" in found:
                delay = str(found["unavailable"].retry_after)
                raise HTTPError(503, "ServiceBusy try again later", [("Retry-After", delay)])
            return self._route(environ, start_response, method, path, found)
        except HTTPError as exc:
            return self._text(start_response, exc.status, exc.text, exc.headers, method)
        except StoreError as exc:
            return self._text(start_response, exc.status, str(exc), [], method)
        except xmldoc.XMLError as exc:
            return self._text(start_response, 400, f"InvalidArgument {exc}", [], method)

    def _route(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        method: str,
        path: str,
        found: dict[faultmod.Kind, faultmod.Fault],
    ) -> Iterable[bytes]:
        head, _, rest = path.lstrip("/").partition("/")
        if head == "capabilities" and method == "GET":
            doc = xmldoc.capabilities(self.base, transfers=self.config.transfers)
            return self._xml(start, 200, doc)
        if head == "availability" and method == "GET":
            return self._xml(start, 200, xmldoc.availability())
        self._authenticate(environ)
        if head == "nodes":
            return self._nodes(environ, start, method, storage.normalize(rest))
        if head == "sync":
            return self._sync(environ, start, method)
        if head == "transfers":
            return self._transfers(environ, start, method, rest)
        if head in ("data", "files"):
            node_path = storage.normalize(rest)
            if method in ("GET", "HEAD"):
                return self._read(environ, start, method, node_path, found)
            if method == "PUT" and head == "data":
                return self._write(environ, start, node_path)
            raise HTTPError(405, f"method {method} not allowed on /{head}")
        raise HTTPError(404, f"NotFound {path}")

    # ---- auth

    def _authenticate(self, environ: dict[str, Any]) -> None:
        token = self.config.token
        presented: str | None = None
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        elif environ.get("HTTP_X_CADC_DELEGATIONTOKEN"):
            presented = environ["HTTP_X_CADC_DELEGATIONTOKEN"].strip()
        if presented is not None:
            if token is None or not hmac.compare_digest(presented.encode(), token.encode()):
                raise HTTPError(401, "NotAuthenticated invalid token", _CHALLENGE)
            return
        if self.config.client_certs and environ.get("HTTPS_DN"):
            return  # uwsgi verified the certificate against the lab's CA
        if self.config.auth_required:
            raise HTTPError(401, "NotAuthenticated credentials required", _CHALLENGE)

    # ---- URIs

    def vos_uri(self, path: str) -> str:
        return f"vos://{self._authority}/{path}"

    def _path_of_uri(self, uri: str) -> str:
        """The node path of ``vos://authority/path`` (``~`` or ``!``; CADC's client sends both)."""
        if not uri.startswith("vos://"):
            raise Invalid("InvalidURI", f"{uri!r} is not a vos:// URI")
        authority, _, path = uri[len("vos://") :].partition("/")
        if authority.replace("!", "~") != self._authority:
            raise Invalid("InvalidURI", f"{uri!r} is not in this service ({self._authority})")
        return storage.normalize(unquote(path.split("?", 1)[0].split("#", 1)[0]))

    def _view(self, node: storage.Node) -> xmldoc.NodeView:
        return xmldoc.NodeView(
            uri=self.vos_uri(node.path),
            type=node.type,
            properties=node.properties(),
            target=node.target,
        )

    def data_url(self, path: str) -> str:
        return f"{self.base}/data/{quote(path)}"

    # ---- nodes

    def _nodes(
        self, environ: dict[str, Any], start: StartResponse, method: str, path: str
    ) -> Iterable[bytes]:
        if method == "GET":
            query = parse_qs(environ.get("QUERY_STRING", ""))
            node = self.store.require(path)
            children: Iterable[xmldoc.NodeView] | None = None
            if node.type == "ContainerNode":
                limit = _int(query.get("limit", [None])[0], "limit")
                first = query.get("uri", [None])[0]
                start_name = None
                if first:
                    child = self._path_of_uri(first)
                    if storage.parent_of(child) != path:
                        raise Invalid("InvalidURI", f"{first} is not a child of /{path}")
                    start_name = child.rpartition("/")[2]
                # limit=0: the node alone (the client asks so before every listing)
                children = (self._view(c) for c in self.store.children(path, start_name, limit))
            pieces = (s.encode() for s in xmldoc.node_document(self._view(node), children))
            return _stream_xml(environ, start, pieces)
        if method == "PUT":
            parsed = xmldoc.parse_node(_read_small(environ))
            if self._path_of_uri(parsed.uri) != path:
                raise Invalid("InvalidURI", f"the node's uri {parsed.uri} is not /{path}")
            node = self.store.create(path, parsed.type, parsed.properties, parsed.target)
            # the node in the body: the client's empty-file upload parses it
            return self._xml(start, 201, "".join(xmldoc.node_document(self._view(node), [])))
        if method == "POST":
            parsed = xmldoc.parse_node(_read_small(environ))
            node = self.store.set_properties(path, parsed.properties, parsed.deleted)
            return self._xml(start, 200, "".join(xmldoc.node_document(self._view(node), [])))
        if method == "DELETE":
            self.store.delete(path)
            return self._text(start, 200, "", [], method)  # what CADC answers (not 204)
        raise HTTPError(405, f"method {method} not allowed on nodes")

    # ---- transfers

    def _sync(self, environ: dict[str, Any], start: StartResponse, method: str) -> Iterable[bytes]:
        params = {k.upper(): v for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        ctype = environ.get("CONTENT_TYPE", "")
        body = _read_small(environ) if method == "POST" else b""
        if "form-urlencoded" in ctype:
            params.update({k.upper(): v for k, v in parse_qs(body.decode()).items()})
        if "TARGET" in params:
            # The parameter form: CADC answers 303 straight to the first endpoint.
            direction = params.get("DIRECTION", [xmldoc.PULL])[0]
            transfer = xmldoc.Transfer(
                params["TARGET"][0], direction, tuple(params.get("PROTOCOL", []))
            )
            job = self._negotiate(transfer)
            if job.phase == "ERROR":
                raise NotFound("NodeNotFound", job.error or "")
            endpoints = self._endpoints(job)
            return self._redirect(start, endpoints[0][1])
        if method != "POST":
            raise HTTPError(405, "sync takes a POSTed transfer document")
        job = self._negotiate(xmldoc.parse_transfer(body))
        return self._redirect(start, f"{self.base}/transfers/{job.id}/results/transferDetails")

    def _negotiate(self, transfer: xmldoc.Transfer) -> storage.Job:
        if transfer.direction not in (xmldoc.PUSH, xmldoc.PULL):
            raise Invalid("InvalidArgument", "sync transfers only push or pull, not a move")
        path = self._path_of_uri(transfer.target)
        error: str | None = None
        try:
            if transfer.direction == xmldoc.PULL:
                node = self.store.require(path)
                if node.type != "DataNode":
                    raise Invalid("InvalidArgument", f"/{path} is not a DataNode")
            else:
                self.store.check_writable(path)
        except StoreError as exc:
            error = str(exc)
        return self.store.new_job(transfer, path, "ERROR" if error else "EXECUTING", error)

    def _endpoints(self, job: storage.Job) -> list[tuple[str, str]]:
        push = job.direction == xmldoc.PUSH
        secure = self.base.startswith("https:")
        wanted = [p for p in job.protocols if (p in (xmldoc.PROTO_PUT, xmldoc.PROTO_SPUT)) == push]
        wanted = [p for p in wanted if p in _PROTOCOLS]
        if not wanted:
            wanted = [
                (xmldoc.PROTO_SPUT if secure else xmldoc.PROTO_PUT)
                if push
                else (xmldoc.PROTO_SGET if secure else xmldoc.PROTO_GET)
            ]
        return [(p, self.data_url(job.target)) for p in wanted]

    def _transfers(
        self, environ: dict[str, Any], start: StartResponse, method: str, rest: str
    ) -> Iterable[bytes]:
        parts = [p for p in rest.split("/") if p]
        if not parts:
            if method != "POST":
                raise HTTPError(405, "POST a transfer document to create a job")
            return self._new_move(environ, start)
        job = self.store.job(parts[0])
        tail = "/".join(parts[1:])
        if tail == "" and method == "GET":
            return self._xml(start, 200, xmldoc.job_document(job.id, job.phase, job.error))
        if tail == "phase" and method == "GET":
            return self._text(start, 200, job.phase, [], method)
        if tail == "phase" and method == "POST":
            form = parse_qs(_read_small(environ).decode())
            if form.get("PHASE", [""])[0].upper() == "RUN" and job.phase == "PENDING":
                self._run_move(job)
            return self._redirect(start, f"{self.base}/transfers/{job.id}")
        if tail == "error" and method == "GET":
            return self._text(start, 200, job.error or "", [], method)
        if tail == "results/transferDetails" and method == "GET":
            transfer = xmldoc.Transfer(self.vos_uri(job.target), job.direction, job.protocols)
            endpoints = [] if job.phase == "ERROR" else self._endpoints(job)
            return self._xml(start, 200, xmldoc.transfer_document(transfer, endpoints))
        raise HTTPError(404, f"NotFound transfers/{rest}")

    def _new_move(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        """An async transfer: only MoveNode (direction = a vos:// URI, keepBytes false)."""
        transfer = xmldoc.parse_transfer(_read_small(environ))
        if not transfer.direction.startswith("vos://") or transfer.keep_bytes:
            raise Invalid("InvalidArgument", "async transfers here only move nodes")
        src = self._path_of_uri(transfer.target)
        self._path_of_uri(transfer.direction)  # validates the destination now
        job = self.store.new_job(transfer, src, "PENDING", None)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if query.get("PHASE", [""])[0].upper() == "RUN":
            self._run_move(job)
        return self._redirect(start, f"{self.base}/transfers/{job.id}")

    def _run_move(self, job: storage.Job) -> None:
        try:
            self.store.move(job.target, self._path_of_uri(job.direction))
        except StoreError as exc:
            self.store.set_phase(job.id, "ERROR", str(exc))
        else:
            self.store.set_phase(job.id, "COMPLETED")

    # ---- data

    def _read(
        self,
        environ: dict[str, Any],
        start: StartResponse,
        method: str,
        path: str,
        found: dict[faultmod.Kind, faultmod.Fault],
    ) -> Iterable[bytes]:
        node = self.store.require(path)
        blob = self.store.blob_path(node)
        if node.type != "DataNode" or blob is None or node.md5 is None:
            raise NotFound("NodeNotFound", f"/{path} holds no data")
        try:
            f = blob.open("rb")
        except FileNotFoundError:  # replaced by an upload between the lookup and the open
            raise HTTPError(
                503, "ServiceBusy the node changed; retry", [("Retry-After", "1")]
            ) from None
        try:
            length = node.length
            digest = node.md5
            if "wrong_digest" in found:
                digest = hashlib.md5(digest.encode()).hexdigest()
            headers: Headers = [
                ("Content-Type", "application/octet-stream"),
                ("Accept-Ranges", "bytes"),
                ("Last-Modified", formatdate(node.mtime, usegmt=True)),
                ("Digest", md5_digest(digest)),
                ("ETag", f'"{node.md5}"'),
                ("Content-Disposition", f'inline; filename="{_filename(node.name)}"'),
            ]
            status, first, count = 200, 0, length
            rng = environ.get("HTTP_RANGE")
            if rng:
                span = _byte_range(rng, length)
                if span is not None:
                    first, last = span
                    status, count = 206, last - first + 1
                    headers.append(("Content-Range", f"bytes {first}-{last}/{length}"))
            headers.append(("Content-Length", str(count)))
        except BaseException:
            f.close()
            raise
        start(_status(status), headers)
        if method == "HEAD":
            f.close()
            return []
        return _FileBody(f, first, count, found.get("slow"), found.get("cut"), environ)

    def _write(self, environ: dict[str, Any], start: StartResponse, path: str) -> Iterable[bytes]:
        length_header = environ.get("CONTENT_LENGTH", "")
        length = int(length_header) if length_header.strip() else None
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if environ.get("HTTP_X_PUT_TXN_OP", "").lower() == "start" and not length and not chunked:
            # CADC's client opens a segmented upload with an empty PUT. Not answering with
            # x-put-txn-id makes it fall back to one plain PUT: nothing to create or truncate.
            return self._text(start, 200, "", [], "PUT")
        if environ.get("HTTP_X_PUT_TXN_ID") or environ.get("HTTP_X_PUT_TXN_OP"):
            op = environ.get("HTTP_X_PUT_TXN_OP", "").lower()
            if op not in ("", "start"):
                raise HTTPError(400, f"InvalidArgument segmented uploads are not offered ({op})")
        expected = _parse_digest(environ.get("HTTP_DIGEST", ""))
        self.store.check_writable(path)
        blob, part = self.store.new_blob()
        md5 = hashlib.md5()
        size = 0
        try:
            with part.open("wb") as out:
                for chunk in _input(environ, length, chunked):
                    md5.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if length is not None and size != length:
                raise HTTPError(400, f"InvalidArgument got {size} of {length} bytes")
            actual = md5.hexdigest()
            if expected is not None and expected != actual:
                raise HTTPError(
                    412,
                    f"PreconditionFailed the body's md5 {actual} is not the Digest's {expected}",
                )
            node = self.store.commit_data(path, blob, part, size, actual)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        headers: Headers = [("Digest", md5_digest(actual)), ("ETag", f'"{actual}"')]
        del node
        return self._text(start, 201, "", headers, "PUT")

    # ---- answers

    def _xml(self, start: StartResponse, code: int, doc: str) -> Iterable[bytes]:
        data = doc.encode()
        start(
            _status(code),
            [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def _text(
        self, start: StartResponse, code: int, text: str, headers: Headers, method: str
    ) -> Iterable[bytes]:
        data = text.encode()  # no newline: the client compares job phases as strings
        start(
            _status(code),
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(data))),
                *headers,
            ],
        )
        return [] if method == "HEAD" else [data]

    def _redirect(self, start: StartResponse, location: str) -> Iterable[bytes]:
        start(_status(303), [("Location", location), ("Content-Length", "0")])
        return []


_CHALLENGE: Headers = [("WWW-Authenticate", 'Bearer realm="imagesync-lab-vospace"')]
_PROTOCOLS = (xmldoc.PROTO_GET, xmldoc.PROTO_PUT, xmldoc.PROTO_SGET, xmldoc.PROTO_SPUT)


def _stream_xml(
    environ: dict[str, Any], start: StartResponse, pieces: Iterator[bytes]
) -> Iterable[bytes]:
    """A listing with a Content-Length when it is small (keep-alive clients need one), else
    streamed and delimited by closing the connection: never rendered whole in memory."""
    head: list[bytes] = []
    size = 0
    for piece in pieces:
        head.append(piece)
        size += len(piece)
        if size > MAX_XML:
            break
    else:
        start(
            _status(200),
            [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(size))],
        )
        return head
    headers = [("Content-Type", "text/xml; charset=utf-8")]
    if "uwsgi.version" in environ:
        # uwsgi's http11 socket would keep the connection open after a body of unknown
        # length; WSGI servers like wsgiref close it anyway (and refuse hop-by-hop headers)
        headers.append(("Connection", "close"))
    start(_status(200), headers)
    return itertools.chain(head, pieces)


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise Invalid("InvalidArgument", f"{name}={value!r} is not a number") from None
    if number < 0:
        raise Invalid("InvalidArgument", f"{name} must not be negative")
    return number


def _filename(name: str) -> str:
    return name.replace('"', "_").replace("\\", "_") or "root"


def _read_small(environ: dict[str, Any]) -> bytes:
    length = environ.get("CONTENT_LENGTH", "")
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    data = bytearray()
    for chunk in _input(environ, int(length) if length.strip() else None, chunked):
        data += chunk
        if len(data) > MAX_XML:
            raise HTTPError(413, "RequestEntityTooLarge documents are limited to 1 MiB")
    return bytes(data)


def _input(environ: dict[str, Any], length: int | None, chunked: bool) -> Iterator[bytes]:
    """The request body a chunk at a time (never all of it at once)."""
    stream = environ["wsgi.input"]
    if length is None and not chunked:
        return
    if chunked and length is None and "uwsgi.version" in environ:
        # uwsgi (--http-chunked-input) leaves a chunked body raw: it is read chunk by chunk
        import uwsgi

        while chunk := uwsgi.chunked_read(600):
            yield chunk
        return
    left = length
    while left is None or left > 0:
        chunk = stream.read(INPUT_CHUNK if left is None else min(INPUT_CHUNK, left))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


class _FileBody:
    """A data response's body: ``count`` bytes of ``f`` from ``first``, a chunk at a time,
    slowed down or cut short when a fault says so."""

    def __init__(
        self,
        f: Any,
        first: int,
        count: int,
        slow: faultmod.Fault | None,
        cut: faultmod.Fault | None,
        environ: dict[str, Any],
    ) -> None:
        self.f = f
        self.first = first
        self.count = count
        self.slow = slow
        self.cut = cut
        self.environ = environ

    def __iter__(self) -> Iterator[bytes]:
        self.f.seek(self.first)
        left = self.count
        sent = 0
        while left > 0:
            size = min(CHUNK, left)
            if self.cut is not None:
                size = min(size, max(0, self.cut.after_bytes - sent)) or size
            if self.slow is not None:
                time.sleep(self.slow.delay)
            chunk = self.f.read(size)
            if not chunk:
                break
            yield chunk
            sent += len(chunk)
            left -= len(chunk)
            if self.cut is not None and sent >= self.cut.after_bytes and left > 0:
                _cut_connection(self.environ)
                return

    def close(self) -> None:
        self.f.close()


def _cut_connection(environ: dict[str, Any]) -> None:
    """Close the client's connection mid-body (a fault hook): under uwsgi, shut the socket
    down so the client sees a short read at once instead of waiting for its timeout."""
    with contextlib.suppress(Exception):
        import uwsgi

        fd = uwsgi.connection_fd()
        sock = socket.socket(fileno=os.dup(fd))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    raise ConnectionAbortedError("fault hook: connection cut")


def make_app(config: ServiceConfig) -> VOSpaceApp:
    return VOSpaceApp(config)


def app_from_env() -> VOSpaceApp:
    """The application for uwsgi: its configuration file is named by $IMAGESYNC_VOSPACE_CONFIG."""
    return make_app(ServiceConfig.load(Path(os.environ[CONFIG_ENV])))
