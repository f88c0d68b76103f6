"""The one fault-injecting HTTP/1.1 proxy put in front of a real Glance in the tests.

It forwards bytes unchanged except when its :class:`FaultPlan` says otherwise: flip one byte of
an image upload body (``PUT …/file``) or download body (``GET …/file``), cut the connection
part-way through an upload or a download (also at given image offsets, a ranged download
counted from its Content-Range), slow uploads or downloads of image data down (a link capped
at so many bytes/s: the benchmarks' throttled cloud), answer
a burst of requests with a 5xx itself (without forwarding them), lose the answer to a request
Glance did carry out (the connection drops after Glance answered: the client cannot tell
whether it happened), or be a black hole (accept connections, never answer: a site whose every
request times out). It understands Content-Length and chunked framing, so a flipped byte always
lands in image data, never in HTTP framing. ``stop()`` closes the port and every connection (a
site gone down); ``start()`` opens the same port again (the site back, at the same address).
Bounded: it serves loopback only and stops on close().

Every request Glance answered is kept in ``audit`` (method, path, status, and the body of small
non-data requests), whether or not the answer reached the client: the fault suite reads from
it which images were published and which were deleted (``published_ids``/``deleted_ids``).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

_FILE = re.compile(rb"^(PUT|GET) /v2/images/[0-9a-f-]+/file ")
#: the data endpoints of the lab's VOSpace service (``/data/…``, the ``/files/…`` shortcut)
VOSPACE_DATA = re.compile(rb"^(PUT|GET) /(?:data|files)/\S+ ")
_IMAGE_PATH = re.compile(r"^/v2/images/([0-9a-f-]{36})(/file)?$")
#: bodies of requests up to this size are kept in the audit (JSON: create, update)
_AUDIT_BODY = 1 << 16


@dataclass
class FaultPlan:
    flip_upload_at: int | None = None  # data offset of the byte to flip in an upload
    flip_download_at: int | None = None
    cut_upload_after: int | None = None  # close both sides after this many upload bytes
    cut_times: int = 1
    throttle_upload: float = 0.0  # seconds to sleep per 64 KiB of upload data
    download_rate: float = 0.0  # bytes/s of image data downloaded; 0: as fast as it comes
    cut_download_after: int | None = None  # close both sides after this many bytes downloaded
    cut_download_times: int = 1
    #: image offsets (not body offsets: a Range answer starts at its Content-Range) at which
    #: a download is cut, each once, in order
    cut_download_at: list[int] = field(default_factory=list)
    upload_rate: float = 0.0  # bytes/s of image data uploaded; 0: as fast as it comes
    downloaded: int = 0  # bytes of image data the proxy passed on to downloading clients
    fail_requests: int = 0  # answer the next N requests with fail_status, not forwarding them
    fail_status: int = 503
    fail_methods: tuple[str, ...] = ()  # only requests with these methods fail (empty: any)
    lose_responses: int = 0  # forward the next N requests, then drop the connection unanswered
    lose_methods: tuple[str, ...] = ()  # only answers to these methods are lost (empty: any)
    blackhole: bool = False  # new connections are held open and never answered
    flips: int = 0  # how many flips happened
    cuts: int = 0  # connections cut part-way through an upload or a download
    #: called with each request line (``GET /v2/images?… HTTP/1.1``) before it is forwarded;
    #: it may act meanwhile (change the cloud behind the proxy's back), and may return a
    #: whole raw HTTP response to send instead of forwarding (the connection then closes)
    on_request: Callable[[bytes], bytes | None] | None = None
    failed: int = 0  # requests answered with fail_status by the proxy
    lost: int = 0  # answers lost after Glance carried the request out
    slowed: int = 0  # image data bodies slowed down (uploads and downloads)

    def take_failure(self, method: str) -> bool:
        """Answer this request (of ``method``) with ``fail_status``? (One of them used.)"""
        return self._take("fail_requests", self.fail_methods, "failed", method)

    def take_loss(self, method: str) -> bool:
        """Lose the answer to this request (of ``method``)? (One of them used.)"""
        return self._take("lose_responses", self.lose_methods, "lost", method)

    def take_cut(self, kind: str, end: int) -> bool:
        """Cut the connection now that ``end`` bytes of ``kind`` data went by? (One used.)"""
        after, left = {
            "PUT-up": (self.cut_upload_after, "cut_times"),
            "GET-down": (self.cut_download_after, "cut_download_times"),
        }.get(kind, (None, ""))
        return after is not None and end > after and self._take(left, (), "cuts", "")

    def _take(self, left: str, methods: tuple[str, ...], used: str, method: str) -> bool:
        """Use one of the counted faults in field ``left`` on a request of ``method`` (when
        ``methods`` names it, or names none), counting it in field ``used``."""
        if getattr(self, left) <= 0 or (methods and method not in methods):
            return False
        setattr(self, left, getattr(self, left) - 1)
        setattr(self, used, getattr(self, used) + 1)
        return True


@dataclass
class Exchange:
    """One request Glance answered (``status``), as the proxy saw it go by."""

    method: str
    path: str
    body: bytes = b""
    status: int = 0
    delivered: bool = True  # did the answer reach the client (False: lost on purpose)
    at: float = field(default_factory=time.monotonic)

    @property
    def image_id(self) -> str | None:
        m = _IMAGE_PATH.match(self.path.split("?", 1)[0])
        return m.group(1) if m else None

    @property
    def publishes(self) -> bool:
        """A successful update that removed imagesync's ``uploading`` mark: a publish."""
        if self.method != "PATCH" or not 200 <= self.status < 300:
            return False
        try:
            ops = json.loads(self.body)
        except ValueError:
            return False
        return any(
            isinstance(op, dict)
            and op.get("op") == "remove"
            and op.get("path") == "/imagesync.state"
            for op in (ops if isinstance(ops, list) else [])
        )


class _Dest(Protocol):
    def sendall(self, data: bytes, /) -> None: ...


class _Sink:
    """A socket-like destination that keeps (up to a bound) or drops what it is sent."""

    def __init__(self, keep: int = 0) -> None:
        self.keep = keep
        self.data = bytearray()

    def sendall(self, data: bytes) -> None:
        room = self.keep - len(self.data)
        if room > 0:
            self.data += data[:room]


class _Tee:
    """Send to ``dst`` and keep a bounded copy (a request body for the audit)."""

    def __init__(self, dst: _Dest, sink: _Sink) -> None:
        self.dst = dst
        self.sink = sink

    def sendall(self, data: bytes) -> None:
        self.dst.sendall(data)
        self.sink.sendall(data)


class _Conn:
    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        if proxy.plan.upload_rate:
            # a capped link holds a small window, not the megabytes loopback buffers in the
            # kernel (which would let a sender run far ahead of the cap)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 17)
        self.upstream = socket.create_connection(("127.0.0.1", proxy.upstream_port))
        proxy._track(client, self.upstream)
        self.requests: list[Exchange] = []  # requests awaiting their response
        self.lock = threading.Lock()

    def run(self) -> None:
        t = threading.Thread(target=self._pump, args=(False,), daemon=True)
        t.start()
        self._pump(True)
        t.join(timeout=5)

    def close(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    # framing ---------------------------------------------------------------------------------
    def _pump(self, to_server: bool) -> None:
        src, dst = (self.client, self.upstream) if to_server else (self.upstream, self.client)
        reader = src.makefile("rb", buffering=1 << 16)
        try:
            while True:
                head = self._read_head(reader)
                if head is None:
                    break
                first = head.split(b"\r\n", 1)[0]
                hook = self.proxy.plan.on_request
                canned = hook(first) if to_server and hook is not None else None
                if canned is not None:
                    self.client.sendall(canned)
                    break
                if to_server:
                    if not self._request(reader, dst, head, first):
                        break
                    continue
                with self.lock:
                    ex = self.requests.pop(0) if self.requests else Exchange("", "")
                req = f"{ex.method} {ex.path} ".encode()
                match = self.proxy.data_path.match(req)
                kind = "GET-down" if match and match.group(1) == b"GET" else ""
                parts = head.split(b" ", 2)
                ex.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                if self._lose(ex):
                    break  # Glance did it; the client never hears so
                self.proxy._audit(ex)
                dst.sendall(head)
                if ex.method == "HEAD":
                    continue  # the answer to HEAD has headers only, whatever they announce
                start = _range_start(head) if kind else 0
                if not self._body(reader, dst, head, kind, to_server, start):
                    break
        except OSError:
            pass
        finally:
            self.close()

    def _request(self, reader: object, dst: _Dest, head: bytes, first: bytes) -> bool:
        """Forward one request (or answer it with a 5xx, per the plan); False: stop."""
        words = first.decode("latin-1").split(" ")
        ex = Exchange(words[0], words[1] if len(words) > 1 else "")
        match = self.proxy.data_path.match(first)
        kind = (match.group(1).decode() + "-up") if match else ""
        plan = self.proxy.plan
        with self.proxy._lock:
            fail = plan.take_failure(ex.method)
        if fail:
            # Read the body (so the client is not cut off mid-send), answer, and hang up: the
            # request never reached Glance.
            self._body(reader, _Sink(), head, "", True)
            status = plan.fail_status
            self.client.sendall(
                f"HTTP/1.1 {status} Injected\r\nContent-Type: text/plain\r\n"
                f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            return False
        with self.lock:
            self.requests.append(ex)
        dst.sendall(head)
        sink = _Sink(0 if kind else _AUDIT_BODY)
        ok = self._body(reader, _Tee(dst, sink), head, kind, True)
        ex.body = bytes(sink.data)
        return ok

    def _lose(self, ex: Exchange) -> bool:
        with self.proxy._lock:
            lose = self.proxy.plan.take_loss(ex.method)
        if lose:
            ex.delivered = False
            self.proxy._audit(ex)
        return lose

    @staticmethod
    def _read_head(reader: object) -> bytes | None:
        lines = []
        while True:
            line = reader.readline(65537)  # type: ignore[attr-defined]
            if not line:
                return None
            lines.append(line)
            if line in (b"\r\n", b"\n"):
                return b"".join(lines)

    def _body(
        self, reader: object, dst: _Dest, head: bytes, kind: str, to_server: bool, start: int = 0
    ) -> bool:
        lower = head.lower()
        status = head.split(b" ", 2)[1] if not to_server and b" " in head else b""
        if not to_server and (status in (b"204", b"304") or status.startswith(b"1")):
            return True
        m = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
        offset = [0]
        if b"transfer-encoding: chunked" in lower:
            while True:
                size_line = reader.readline()  # type: ignore[attr-defined]
                if not size_line:
                    return False
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Send the last chunk and the final CRLF together, as clients do: uwsgi
                    # leaves a late CRLF to be parsed as the start of the next request.
                    trailer = reader.readline()  # type: ignore[attr-defined]
                    dst.sendall(size_line + trailer)
                    return True
                dst.sendall(size_line)
                if not self._data(reader, dst, size, kind, offset, start):
                    return False
                dst.sendall(reader.read(2))  # type: ignore[attr-defined]
        elif m:
            return self._data(reader, dst, int(m.group(1)), kind, offset, start)
        elif not to_server:  # body until close
            return self._data(reader, dst, 1 << 62, kind, offset, start)
        return True

    def _data(
        self, reader: object, dst: _Dest, size: int, kind: str, offset: list[int], image_at: int
    ) -> bool:
        """Pass ``size`` bytes of a body on (``offset``: how far into the body, ``image_at``:
        the image offset the body starts at), with the plan's faults."""
        plan = self.proxy.plan
        left = size
        while left > 0:
            data = reader.read1(min(left, 1 << 16))  # type: ignore[attr-defined]
            if not data:
                return False
            start, end = offset[0], offset[0] + len(data)
            flip_at = {"PUT-up": plan.flip_upload_at, "GET-down": plan.flip_download_at}.get(kind)
            if flip_at is not None and start <= flip_at < end:
                buf = bytearray(data)
                buf[flip_at - start] ^= 0x01
                data = bytes(buf)
                plan.flips += 1
            if plan.take_cut(kind, end):
                return False  # drop the connection mid-body
            if (
                kind == "GET-down"
                and plan.cut_download_at
                and image_at + end > plan.cut_download_at[0]
            ):
                keep = plan.cut_download_at.pop(0) - image_at - start
                if keep > 0:
                    dst.sendall(data[:keep])
                    plan.downloaded += keep
                plan.cuts += 1
                return False
            if kind == "PUT-up" and plan.upload_rate:
                plan.slowed += start == 0
                time.sleep(len(data) / plan.upload_rate)
            if kind == "PUT-up" and plan.throttle_upload:
                plan.slowed += start == 0
                time.sleep(plan.throttle_upload * len(data) / 65536)
            if kind == "GET-down" and plan.download_rate:
                plan.slowed += start == 0
                time.sleep(len(data) / plan.download_rate)
            dst.sendall(data)
            if kind == "GET-down":
                plan.downloaded += len(data)
            offset[0] = end
            left -= len(data)
        return True


def _range_start(head: bytes) -> int:
    """The image offset a response's body starts at (its Content-Range; 0 without one)."""
    m = re.search(rb"\r\ncontent-range:\s*bytes\s+(\d+)-", head.lower())
    return int(m.group(1)) if m else 0


class FaultProxy:
    """Listen on a free loopback port; forward to ``upstream_port`` with ``plan``'s faults."""

    def __init__(self, upstream_port: int, data_path: re.Pattern[bytes] = _FILE) -> None:
        self.upstream_port = upstream_port
        #: which requests carry image data (group 1: the method): Glance's by default
        self.data_path = data_path
        self.plan = FaultPlan()
        self.port = 0  # chosen by the first start(), kept by the next ones
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.audit: list[Exchange] = []  # what Glance answered, in order
        self.start()

    def _audit(self, ex: Exchange) -> None:
        with self._lock:
            self.audit.append(ex)

    def published_ids(self) -> set[str]:
        """Images a publish (update removing the uploading mark) succeeded for, at Glance."""
        with self._lock:
            return {ex.image_id for ex in self.audit if ex.publishes and ex.image_id}

    def deleted_ids(self) -> dict[str, Exchange]:
        """Images Glance was asked to delete (the first such request for each)."""
        out: dict[str, Exchange] = {}
        with self._lock:
            for ex in self.audit:
                iid = ex.image_id
                if ex.method == "DELETE" and iid and not ex.path.endswith("/file"):
                    out.setdefault(iid, ex)
        return out

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again, on the same port after a stop())."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._sock = sock
        threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        """Close the port and every connection through it."""
        if self._sock is not None:
            # shutdown first: on Linux, close() alone leaves the thread blocked in accept()
            # holding the port open
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    close = stop

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._conns.extend(socks)

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            if self.plan.blackhole:
                self._track(client)  # held open, never answered, until stop()
                continue
            try:
                conn = _Conn(self, client)
            except OSError:
                client.close()
                continue
            threading.Thread(target=conn.run, daemon=True).start()
