"""The one fault-injecting HTTP/1.1 proxy put in front of a real Glance in the tests.

It forwards bytes unchanged except when its :class:`FaultPlan` says otherwise: flip one byte of
an image upload body (``PUT …/file``) or download body (``GET …/file``), cut the connection
part-way through an upload, slow uploads or downloads of image data down, or be a black hole
(accept connections, never answer: a site whose every request times out). It understands
Content-Length and chunked framing, so a flipped byte always lands in image data, never in
HTTP framing. ``stop()`` closes the port and every connection (a site gone down); ``start()``
opens the same port again (the site back, at the same address). Bounded: it serves loopback
only and stops on close().
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_FILE = re.compile(rb"^(PUT|GET) /v2/images/[0-9a-f-]+/file ")
#: the data endpoints of the lab's VOSpace service (``/data/…``, the ``/files/…`` shortcut)
VOSPACE_DATA = re.compile(rb"^(PUT|GET) /(?:data|files)/\S+ ")


@dataclass
class FaultPlan:
    flip_upload_at: int | None = None  # data offset of the byte to flip in an upload
    flip_download_at: int | None = None
    cut_upload_after: int | None = None  # close both sides after this many upload bytes
    cut_times: int = 1
    throttle_upload: float = 0.0  # seconds to sleep per 64 KiB of upload data
    download_rate: float = 0.0  # bytes/s of image data downloaded; 0: as fast as it comes
    blackhole: bool = False  # new connections are held open and never answered
    flips: int = 0  # how many flips happened
    cuts: int = 0
    #: called with each request line (``GET /v2/images?… HTTP/1.1``) before it is forwarded;
    #: it may act meanwhile (change the cloud behind the proxy's back), and may return a
    #: whole raw HTTP response to send instead of forwarding (the connection then closes)
    on_request: Callable[[bytes], bytes | None] | None = None


class _Conn:
    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = socket.create_connection(("127.0.0.1", proxy.upstream_port))
        proxy._track(client, self.upstream)
        self.requests: list[bytes] = []  # request lines awaiting their response
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
                    with self.lock:
                        self.requests.append(first)
                    match = self.proxy.data_path.match(first)
                    kind = (match.group(1).decode() + "-up") if match else ""
                    req = first
                else:
                    with self.lock:
                        req = self.requests.pop(0) if self.requests else b""
                    match = self.proxy.data_path.match(req)
                    kind = "GET-down" if match and match.group(1) == b"GET" else ""
                dst.sendall(head)
                if not to_server and req.startswith(b"HEAD "):
                    continue  # the answer to HEAD has headers only, whatever they announce
                if not self._body(reader, dst, head, kind, to_server):
                    break
        except OSError:
            pass
        finally:
            self.close()

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
        self, reader: object, dst: socket.socket, head: bytes, kind: str, to_server: bool
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
                if not self._data(reader, dst, size, kind, offset):
                    return False
                dst.sendall(reader.read(2))  # type: ignore[attr-defined]
        elif m:
            return self._data(reader, dst, int(m.group(1)), kind, offset)
        elif not to_server:  # body until close
            return self._data(reader, dst, 1 << 62, kind, offset)
        return True

    def _data(
        self, reader: object, dst: socket.socket, size: int, kind: str, offset: list[int]
    ) -> bool:
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
            if (
                kind == "PUT-up"
                and plan.cut_upload_after is not None
                and plan.cut_times > 0
                and end > plan.cut_upload_after
            ):
                plan.cut_times -= 1
                plan.cuts += 1
                return False  # drop the connection mid-body
            if kind == "PUT-up" and plan.throttle_upload:
                time.sleep(plan.throttle_upload * len(data) / 65536)
            if kind == "GET-down" and plan.download_rate:
                time.sleep(len(data) / plan.download_rate)
            dst.sendall(data)
            offset[0] = end
            left -= len(data)
        return True


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
        self.start()

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
