"""Prometheus metrics of the daemon, served on ``metrics_listen`` when it is set, with the
daemon's read-only status pages beside them (``/`` and ``/status.json``: the daemon passes
them in as :class:`Page` makers, rendered by :mod:`imagesync.daemon.statuspage`).

The metrics live in a private registry (not prometheus_client's global one), so two daemons in
one test process, or a reload, never collide. They are fed from two places: the executor's
:class:`~imagesync.execute.Observer` callbacks (transfers starting and ending, from the
transfer threads) and the daemon's pass (inventories and assessments, once a pass). The engine
itself never imports this module.

    imagesync_bytes_copied_total                       bytes of verified, published copies
    imagesync_copies_total{result="ok"|"failed"}       copies per target
    imagesync_copy_failures_total{site,kind}           failed copies by target and error kind
                                                       (integrity, transient, site, source,
                                                       unexpected)
    imagesync_retires_total{result="ok"|"failed"}      retirements (hide or delete)
    imagesync_sync_lag_seconds{image,site}             now - newest version time where the
                                                       newest is not there yet; 0 when current
    imagesync_last_successful_poll_timestamp_seconds{site}
    imagesync_site_reachable{site}                     1 when the last pass listed it, else 0
    imagesync_transfers_in_flight
    imagesync_passes_total{result="ok"|"failed"}, imagesync_last_pass_duration_seconds
    imagesync_last_pass_timestamp_seconds              when the last pass ended (Unix time;
                                                       before the first: when it started)
    imagesync_poll_interval_seconds                    the configured poll interval

``etc/grafana/imagesync.json`` and ``etc/prometheus/imagesync-alerts.yaml`` are built on these
names (a unit test holds every expression there to the names exported here).

The listener is bounded: at most :data:`MAX_CONNECTIONS` handler threads (a new connection
past that closes the oldest, so idle or slow clients can neither pile up threads nor keep a
scrape out), and a connection that sends nothing for :data:`IDLE_TIMEOUT` seconds is closed.
prometheus_client's own server keeps a thread per connection for as long as the client likes.
An address beyond loopback is logged as a warning when served (the configuration refuses one
unless ``metrics_listen_public: true`` says it is meant).
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, make_wsgi_app

from imagesync.config.types import listens_on_loopback
from imagesync.coordination import CoordinationStatus, Health
from imagesync.engine import ActionResult, Observer
from imagesync.model import SiteInventory
from imagesync.plan import Assessment, Copy, Retire
from imagesync.transfer import ErrorKind

log = structlog.get_logger("imagesync.metrics")

#: the ``kind`` label values of imagesync_copy_failures_total
FAILURE_KINDS = tuple(k.value for k in ErrorKind if k.counts_as_failure)

#: handler threads at most: a scrape takes milliseconds, Prometheus opens one at a time
MAX_CONNECTIONS = 8
#: the name of every connection's handler thread (to count them)
HANDLER_THREAD_NAME = "imagesync-metrics-connection"
#: seconds a connection may stay silent (before its request, or between its bytes)
IDLE_TIMEOUT = 10.0


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, _, port = listen.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{listen!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Page:
    """One response of a read-only page: its type, body and extra headers."""

    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


#: path → what makes its response, called once per request (in a handler thread)
Pages = Mapping[str, Callable[[], Page]]

METRICS_PATH = "/metrics"


def _routes(metrics_app: Any, pages: Pages) -> Any:
    """A WSGI app: ``/metrics`` to prometheus_client, the pages to their makers; read-only
    (GET and HEAD), 404 for any other path."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes] | list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == METRICS_PATH:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        make = pages.get(path)
        if make is None:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found\n"]
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed",
                [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")],
            )
            return [b"read-only\n"]
        page = make()
        headers = [
            ("Content-Type", page.content_type),
            ("Content-Length", str(len(page.body))),
            *page.headers,
        ]
        start_response("200 OK", headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [page.body]

    return app


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: scrapes are not events."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``max_connections`` of them, each with a timeout."""

    block_on_close = False  # nothing to join at close: few threads, each timed out
    # a burst of connections waits in the kernel's queue rather than in SYN retries (1 s, 3 s…)
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], family: int, max_connections: int, idle_timeout: float
    ) -> None:
        self.address_family = family  # read by TCPServer.__init__ when it makes the socket
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        # handler threads and their connections, oldest first; touched by the accepting
        # thread only, so it needs no lock
        self._conns: dict[threading.Thread, socket.socket] = {}
        super().__init__(address, _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        for done in [t for t in self._conns if not t.is_alive()]:
            del self._conns[done]
        if len(self._conns) >= self.max_connections:
            # Make room: shutting the oldest connection down ends its thread's read or write
            # at once; joining it keeps the count of live threads strictly bounded.
            oldest, conn = next(iter(self._conns.items()))
            with contextlib.suppress(OSError):  # already closed by its thread
                conn.shutdown(socket.SHUT_RDWR)
            oldest.join(self.idle_timeout)
            if oldest.is_alive():  # not expected: refuse rather than go past the bound
                self.shutdown_request(request)
                return
            del self._conns[oldest]
        request.settimeout(self.idle_timeout)
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=HANDLER_THREAD_NAME,
            daemon=True,
        )
        self._conns[thread] = request
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # timeouts and resets are the listener doing its job, not a traceback on stderr
        log.debug("metrics.connection_error", client=str(client_address), exc_info=True)


class Metrics(Observer):
    """The daemon's metrics; also an executor Observer (thread-safe, as prometheus is)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._declare_copies(self.registry)
        self._declare_sites(self.registry)
        self._declare_passes(self.registry)
        for result in ("ok", "failed"):  # present from the start, so rate() works at once
            self.copies.labels(result=result)
            self.retires.labels(result=result)
            self.passes.labels(result=result)
        self._lag_keys: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server: Any = None

    def _declare_copies(self, r: CollectorRegistry) -> None:
        """What the transfers did: bytes, copies and failures, retirements, boot tests."""
        self.bytes_copied = Counter(
            "imagesync_bytes_copied", "Bytes of verified copies published on a target", registry=r
        )
        self.copies = Counter(
            "imagesync_copies", "Copies to one target, by result", ["result"], registry=r
        )
        self.copy_failures = Counter(
            "imagesync_copy_failures",
            "Copies that failed on a target, by target site and error kind",
            ["site", "kind"],
            registry=r,
        )
        self.retires = Counter(
            "imagesync_retires", "Old versions retired, by result", ["result"], registry=r
        )
        self.boot_tests = Counter(
            "imagesync_boot_tests",
            "Boot tests of new versions (a rule's boot_test), by result: passed, or why the "
            "version was quarantined (error, timeout)",
            ["result"],
            registry=r,
        )
        self.in_flight = Gauge("imagesync_transfers_in_flight", "Copies running now", registry=r)

    def _declare_sites(self, r: CollectorRegistry) -> None:
        """How the sites are: lag behind the newest version, last listing, reachable."""
        self.sync_lag = Gauge(
            "imagesync_sync_lag_seconds",
            "Seconds since the newest version "
            "of an image appeared, for a required site that does not hold it "
            "yet; 0 when it does",
            ["image", "site"],
            registry=r,
        )
        self.last_poll = Gauge(
            "imagesync_last_successful_poll_timestamp_seconds",
            "When a site was last listed successfully (Unix time)",
            ["site"],
            registry=r,
        )
        self.site_reachable = Gauge(
            "imagesync_site_reachable",
            "1 when the last pass could list the site, 0 when it could not",
            ["site"],
            registry=r,
        )
        # several daemons (coordination:): is this member allowed to act, how many members
        # it sees, how many calls it made to the service (per pass: the rate)
        self.coordination_ok = Gauge(
            "imagesync_coordination_ok",
            "1 when this member may act (fresh heartbeat, in the group), 0 when it may not",
            registry=r,
        )
        self.coordination_members = Gauge(
            "imagesync_coordination_members", "Live members of the group", registry=r
        )
        self.coordination_calls = Gauge(
            "imagesync_coordination_calls",
            "Calls to the coordination service since start",
            registry=r,
        )

    def _declare_passes(self, r: CollectorRegistry) -> None:
        """The reconcile passes: results, duration, when the last ended, the interval."""
        self.passes = Counter(
            "imagesync_passes", "Reconcile passes, by result", ["result"], registry=r
        )
        self.pass_seconds = Gauge(
            "imagesync_last_pass_duration_seconds",
            "How long the last reconcile pass took",
            registry=r,
        )
        self.last_pass = Gauge(
            "imagesync_last_pass_timestamp_seconds",
            "When the last reconcile pass ended, or before the first when the daemon "
            "started (Unix time)",
            registry=r,
        )
        # so that "no pass for a long time" is measured from the start, not from 1970
        self.last_pass.set(time.time())
        self.poll_interval = Gauge(
            "imagesync_poll_interval_seconds",
            "The configured seconds between two passes (alerts on stopped passes use it)",
            registry=r,
        )

    # -- executor callbacks (transfer threads) ------------------------------------------------
    def copy_started(self, copy: Copy) -> None:
        self.in_flight.inc()

    def copy_finished(self, result: ActionResult) -> None:
        self.in_flight.dec()
        for t in result.targets:
            if t.ok:
                self.copies.labels(result="ok").inc()
                if result.copy is not None:
                    self.bytes_copied.inc(result.copy.bytes_read)
            elif t.error_kind is None or t.error_kind.counts_as_failure:
                # busy: another imagesync is copying it; cancelled: we are stopping
                self.copies.labels(result="failed").inc()
                kind = t.error_kind.value if t.error_kind is not None else "unknown"
                self.copy_failures.labels(site=t.site, kind=kind).inc()

    def retire_finished(self, result: ActionResult) -> None:
        if isinstance(result.action, Retire):
            self.retires.labels(result="ok" if result.ok else "failed").inc()

    # -- once a pass ------------------------------------------------------------------------
    def observe_boot_tests(self, results: Sequence[str]) -> None:
        for result in results:
            self.boot_tests.labels(result=result).inc()

    def observe_inventories(self, inventories: Mapping[str, SiteInventory]) -> None:
        for site, inv in inventories.items():
            for kind in FAILURE_KINDS:  # at 0 before the first failure, so increase() sees it
                self.copy_failures.labels(site=site, kind=kind)
            self.site_reachable.labels(site=site).set(1 if inv.ok else 0)
            if inv.ok and inv.listed_at is not None:
                self.last_poll.labels(site=site).set(inv.listed_at.timestamp())

    def observe_lag(
        self, assessments: Iterable[Assessment], results: Sequence[ActionResult], now: float
    ) -> None:
        """Lag per (image, required site) after a pass; series of names gone are removed."""
        done = {(r.action.name, t.site) for r in results for t in r.targets if t.ok}
        seen: set[tuple[str, str]] = set()
        for a in assessments:
            if a.newest is None:
                continue
            behind = max(0.0, now - a.newest.time.timestamp())
            for site, cell in a.cells.items():
                if not cell.required:
                    continue
                key = (a.name, site)
                seen.add(key)
                if cell.state == "unreachable":
                    continue  # cannot tell: the last known value stays
                lag = 0.0 if cell.state == "current" or key in done else behind
                self.sync_lag.labels(image=a.name, site=site).set(lag)
        with self._lock:
            for image, site in self._lag_keys - seen:
                with contextlib.suppress(KeyError):  # already gone
                    self.sync_lag.remove(image, site)
            self._lag_keys = seen

    def observe_coordination(self, status: CoordinationStatus) -> None:
        self.coordination_ok.set(1 if status.health is Health.OK else 0)
        self.coordination_members.set(len(status.members))
        self.coordination_calls.set(status.calls)

    def observe_pass(self, ok: bool, seconds: float, now: float | None = None) -> None:
        self.passes.labels(result="ok" if ok else "failed").inc()
        self.pass_seconds.set(seconds)
        self.last_pass.set(time.time() if now is None else now)

    # -- exposition --------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return bytes(generate_latest(self.registry))

    def serve(
        self,
        listen: str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        pages: Pages | None = None,
    ) -> tuple[str, int]:
        """Serve /metrics, and ``pages`` (path → maker), on ``listen`` (host:port) from a
        daemon thread; return the address bound (port 0 picks a free one). Raises OSError
        when the address cannot be bound."""
        host, port = parse_listen(listen)
        # the family of the address as given (AF_INET6 for ::1), as prometheus_client does
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server = _BoundedServer((str(sockaddr[0]), port), family, max_connections, idle_timeout)
        server.set_app(_routes(make_wsgi_app(self.registry), pages or {}))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server
        bound = server.server_address
        if not listens_on_loopback(listen):
            log.warning(
                "metrics.listening_public",
                address=listen,
                why="metrics_listen is not a loopback address: every network that reaches "
                "this host can read the image and site names",
            )
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
