"""Prometheus metrics of the daemon, served on ``metrics_listen`` when it is set.

The metrics live in a private registry (not prometheus_client's global one), so two daemons in
one test process, or a reload, never collide. They are fed from two places: the executor's
:class:`~imagesync.execute.Observer` callbacks (transfers starting and ending, from the
transfer threads) and the daemon's pass (inventories and assessments, once a pass). The engine
itself never imports this module.

    imagesync_bytes_copied_total                       bytes of verified, published copies
    imagesync_copies_total{result="ok"|"failed"}       copies per target
    imagesync_retires_total{result="ok"|"failed"}      retirements (hide or delete)
    imagesync_sync_lag_seconds{image,site}             now - newest version time where the
                                                       newest is not there yet; 0 when current
    imagesync_last_successful_poll_timestamp_seconds{site}
    imagesync_transfers_in_flight
    imagesync_passes_total{result="ok"|"failed"}, imagesync_last_pass_duration_seconds
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import start_http_server

from imagesync.engine import ActionResult, Observer
from imagesync.model import SiteInventory
from imagesync.plan import Assessment, Copy, Retire


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, _, port = listen.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{listen!r} is not host:port")
    return host.strip("[]"), int(port)


class Metrics(Observer):
    """The daemon's metrics; also an executor Observer (thread-safe, as prometheus is)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.bytes_copied = Counter(
            "imagesync_bytes_copied", "Bytes of verified copies published on a target", registry=r
        )
        self.copies = Counter(
            "imagesync_copies", "Copies to one target, by result", ["result"], registry=r
        )
        self.retires = Counter(
            "imagesync_retires", "Old versions retired, by result", ["result"], registry=r
        )
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
        self.in_flight = Gauge("imagesync_transfers_in_flight", "Copies running now", registry=r)
        self.passes = Counter(
            "imagesync_passes", "Reconcile passes, by result", ["result"], registry=r
        )
        self.pass_seconds = Gauge(
            "imagesync_last_pass_duration_seconds",
            "How long the last reconcile pass took",
            registry=r,
        )
        for result in ("ok", "failed"):  # present from the start, so rate() works at once
            self.copies.labels(result=result)
            self.retires.labels(result=result)
            self.passes.labels(result=result)
        self._lag_keys: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server: Any = None

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

    def retire_finished(self, result: ActionResult) -> None:
        if isinstance(result.action, Retire):
            self.retires.labels(result="ok" if result.ok else "failed").inc()

    # -- once a pass ------------------------------------------------------------------------
    def observe_inventories(self, inventories: Mapping[str, SiteInventory]) -> None:
        for site, inv in inventories.items():
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

    def observe_pass(self, ok: bool, seconds: float) -> None:
        self.passes.labels(result="ok" if ok else "failed").inc()
        self.pass_seconds.set(seconds)

    # -- exposition --------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return bytes(generate_latest(self.registry))

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve /metrics on ``listen`` (host:port) from a daemon thread; return the address
        bound (port 0 picks a free one). Raises OSError when the address cannot be bound."""
        host, port = parse_listen(listen)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
