"""The lab VOSpace service's HTTP plumbing, below the VOSpace logic of :mod:`.app`.

Errors that carry their status, status lines, the RFC 3230 ``Digest`` and single-range
``Range`` headers, request bodies read a chunk at a time (uwsgi's raw chunked input too), small
XML documents capped at 1 MiB, file bodies streamed a chunk at a time (with the fault hooks
that slow them down or cut the connection), and listings streamed without a length.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from imagesync.lab.vospace import faults as faultmod

CHUNK = 1024 * 1024
# An upload with a Content-Length is read 64 KiB at a time, not 1 MiB (each piece then stays
# in the CPU's cache from the socket to md5 to the file, presumably). With 1 MiB reads it used
# 3.3 CPU s per GiB against 2.4 for the same bytes sent chunked (read as they come, through
# uwsgi.chunked_read); with 64 KiB reads, 2.3 (bench/README.md, bench_vospace.py).
INPUT_CHUNK = 64 * 1024
MAX_XML = 1024 * 1024  # node and transfer documents are small: refuse anything bigger
StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]


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


def status_line(code: int) -> str:
    return f"{code} {_REASONS.get(code, 'Status')}"


def md5_digest(hex_md5: str) -> str:
    """RFC 3230 ``Digest`` value: ``md5=`` and the base64 of the 16 raw bytes."""
    return "md5=" + base64.b64encode(bytes.fromhex(hex_md5)).decode()


def parse_digest(header: str) -> str | None:
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


def byte_range(header: str, length: int) -> tuple[int, int] | None:
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


def stream_xml(
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
            status_line(200),
            [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(size))],
        )
        return head
    headers = [("Content-Type", "text/xml; charset=utf-8")]
    if "uwsgi.version" in environ:
        # uwsgi's http11 socket would keep the connection open after a body of unknown
        # length; WSGI servers like wsgiref close it anyway (and refuse hop-by-hop headers)
        headers.append(("Connection", "close"))
    start(status_line(200), headers)
    return itertools.chain(head, pieces)


def body_framing(environ: dict[str, Any]) -> tuple[int | None, bool]:
    """(Content-Length or None, whether the body is chunked) of a request."""
    length = environ.get("CONTENT_LENGTH", "")
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    return (int(length) if length.strip() else None), chunked


def read_small(environ: dict[str, Any]) -> bytes:
    data = bytearray()
    for chunk in request_body(environ, *body_framing(environ)):
        data += chunk
        if len(data) > MAX_XML:
            raise HTTPError(413, "RequestEntityTooLarge documents are limited to 1 MiB")
    return bytes(data)


def request_body(environ: dict[str, Any], length: int | None, chunked: bool) -> Iterator[bytes]:
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


@dataclasses.dataclass(eq=False)
class FileBody:
    """A data response's body: ``count`` bytes of ``f`` from ``first``, a chunk at a time,
    slowed down or cut short when a fault says so."""

    f: Any
    first: int
    count: int
    slow: faultmod.Fault | None
    cut: faultmod.Fault | None
    environ: dict[str, Any]

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
                cut_connection(self.environ)
                return

    def close(self) -> None:
        self.f.close()


def cut_connection(environ: dict[str, Any]) -> None:
    """Close the client's connection mid-body (a fault hook): under uwsgi, shut the socket
    down so the client sees a short read at once instead of waiting for its timeout."""
    with contextlib.suppress(Exception):
        import uwsgi

        fd = uwsgi.connection_fd()
        sock = socket.socket(fileno=os.dup(fd))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    raise ConnectionAbortedError("fault hook: connection cut")
