"""The lab VOSpace 2.1 service: a WSGI application, streaming in both directions.

Endpoints (under the service's base URL, ``{base}``)::

    GET  /capabilities /availability          VOSI (always anonymous)
    GET|PUT|POST|DELETE /nodes/{path}         nodes: read (limit, uri), create, set props, delete
    POST /sync                                 negotiation → 303 {job}/results/transferDetails
    GET  /transfers/{job}[/phase|/error|/results/transferDetails]
    POST /transfers, POST /transfers/{job}/phase   async MoveNode (keepBytes=false)
    HEAD|GET|PUT /data/{path}                  the bytes; Digest: md5=<base64> on every answer
    HEAD|GET /files/{path}                     the files-proto shortcut (200 with the bytes)
    HEAD|GET /data/preauth:{grant}/{path}      a pull's pre-authorized URL (no credentials)

Uploads are read from ``wsgi.input`` a chunk at a time while hashed, into a new blob that
replaces the node's bytes only once complete and verified (``Digest`` mismatch → 412);
downloads are iterators over the file (``Range`` → 206). What CADC's ``vos`` client relies on is
written down in ``shared/reference/vos-client-recipe.md``; comments here name the quirks.
The HTTP plumbing under it (status lines, ``Digest``, ``Range``, bodies) is :mod:`.wsgiio`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from imagesync.lab.vospace import faults as faultmod
from imagesync.lab.vospace import preauth, storage, xmldoc
from imagesync.lab.vospace.storage import Invalid, NotFound, Store, StoreError
from imagesync.lab.vospace.wsgiio import (
    FileBody,
    Headers,
    HTTPError,
    StartResponse,
    body_framing,
    byte_range,
    md5_digest,
    parse_digest,
    read_small,
    request_body,
    status_line,
    stream_xml,
)

CONFIG_ENV = "IMAGESYNC_VOSPACE_CONFIG"
CONFIG_FILE = "service.json"
#: the faults ``faultmod.take`` found for one request, which the handlers act on
_Faults = dict[faultmod.Kind, faultmod.Fault]


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
        self, environ: dict[str, Any], start: StartResponse, method: str, path: str, found: _Faults
    ) -> Iterable[bytes]:
        head, _, rest = path.lstrip("/").partition("/")
        if head == "capabilities" and method == "GET":
            doc = xmldoc.capabilities(self.base, transfers=self.config.transfers)
            return self._xml(start, 200, doc)
        if head == "availability" and method == "GET":
            return self._xml(start, 200, xmldoc.availability())
        if head in ("data", "files") and rest.startswith(preauth.PREFIX):
            return self._read(environ, start, method, self._preauth_path(method, rest), found)
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

    def _preauth_path(self, method: str, rest: str) -> str:
        """The node a pre-authorized URL (lab/vospace/preauth.py) may read: no credentials."""
        grant, _, node = rest.partition("/")
        path = storage.normalize(node)
        if method not in ("GET", "HEAD"):
            raise HTTPError(405, f"method {method} not allowed on a pre-authorized URL")
        if not preauth.valid(self.config.directory, unquote(grant), path):
            raise HTTPError(403, "PermissionDenied the pre-authorized URL is invalid or expired")
        return path

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
            return stream_xml(environ, start, pieces)
        if method == "PUT":
            parsed = xmldoc.parse_node(read_small(environ))
            if self._path_of_uri(parsed.uri) != path:
                raise Invalid("InvalidURI", f"the node's uri {parsed.uri} is not /{path}")
            node = self.store.create(path, parsed.type, parsed.properties, parsed.target)
            # the node in the body: the client's empty-file upload parses it
            return self._xml(start, 201, "".join(xmldoc.node_document(self._view(node), [])))
        if method == "POST":
            parsed = xmldoc.parse_node(read_small(environ))
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
        body = read_small(environ) if method == "POST" else b""
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
        plain = [(p, self.data_url(job.target)) for p in wanted]
        if push:
            return plain
        # as CADC does, a pull is offered an endpoint with a grant in its path, which works
        # without credentials (lab/vospace/preauth.py); last, so that clients holding
        # credentials keep reading the plain one
        grant = preauth.issue(self.config.directory, job.target)
        return [*plain, (wanted[0], f"{self.base}/data/{grant}/{quote(job.target)}")]

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
            form = parse_qs(read_small(environ).decode())
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
        transfer = xmldoc.parse_transfer(read_small(environ))
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
        self, environ: dict[str, Any], start: StartResponse, method: str, path: str, found: _Faults
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
                span = byte_range(rng, length)
                if span is not None:
                    first, last = span
                    status, count = 206, last - first + 1
                    headers.append(("Content-Range", f"bytes {first}-{last}/{length}"))
            headers.append(("Content-Length", str(count)))
        except BaseException:
            f.close()
            raise
        start(status_line(status), headers)
        if method == "HEAD":
            f.close()
            return []
        body = FileBody(f, first, count, found.get("slow"), found.get("cut"), environ)
        return faultmod.Corrupting(body) if "corrupt" in found else body

    def _write(self, environ: dict[str, Any], start: StartResponse, path: str) -> Iterable[bytes]:
        length, chunked = body_framing(environ)
        if environ.get("HTTP_X_PUT_TXN_OP", "").lower() == "start" and not length and not chunked:
            # CADC's client opens a segmented upload with an empty PUT. Not answering with
            # x-put-txn-id makes it fall back to one plain PUT: nothing to create or truncate.
            return self._text(start, 200, "", [], "PUT")
        if environ.get("HTTP_X_PUT_TXN_ID") or environ.get("HTTP_X_PUT_TXN_OP"):
            op = environ.get("HTTP_X_PUT_TXN_OP", "").lower()
            if op not in ("", "start"):
                raise HTTPError(400, f"InvalidArgument segmented uploads are not offered ({op})")
        expected = parse_digest(environ.get("HTTP_DIGEST", ""))
        self.store.check_writable(path)
        blob, part = self.store.new_blob()
        md5 = hashlib.md5()
        size = 0
        try:
            with part.open("wb") as out:
                for chunk in request_body(environ, length, chunked):
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
            status_line(code),
            [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def _text(
        self, start: StartResponse, code: int, text: str, headers: Headers, method: str
    ) -> Iterable[bytes]:
        data = text.encode()  # no newline: the client compares job phases as strings
        start(
            status_line(code),
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(data))),
                *headers,
            ],
        )
        return [] if method == "HEAD" else [data]

    def _redirect(self, start: StartResponse, location: str) -> Iterable[bytes]:
        start(status_line(303), [("Location", location), ("Content-Length", "0")])
        return []


_CHALLENGE: Headers = [("WWW-Authenticate", 'Bearer realm="imagesync-lab-vospace"')]
_PROTOCOLS = (xmldoc.PROTO_GET, xmldoc.PROTO_PUT, xmldoc.PROTO_SGET, xmldoc.PROTO_SPUT)


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


def make_app(config: ServiceConfig) -> VOSpaceApp:
    return VOSpaceApp(config)


def app_from_env() -> VOSpaceApp:
    """The application for uwsgi: its configuration file is named by $IMAGESYNC_VOSPACE_CONFIG."""
    return make_app(ServiceConfig.load(Path(os.environ[CONFIG_ENV])))
