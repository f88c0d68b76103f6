"""What the daemon knows right now, for its status page and ``/status.json``.

The pass hands over what it found (the inventories and the plan's assessments, then the results
of its copies, then its report); the executor's :class:`~imagesync.engine.Observer` hooks say
which copies are running and how far they got; recent history is read from the state database
when asked. :meth:`LiveStatus.document` puts it together as one JSON-ready document whose
``images`` and ``unreachable`` keys have exactly the shape ``imagesync status --json`` prints
(one function builds both: :func:`imagesync.engine.report.status_document`).

Thread-safe: the pass thread, the transfer threads and the listener's handler threads all touch
it, under a lock held only to copy plain data in or out (rendering happens outside it); the
history cache has a lock of its own, so a read waiting on a busy database holds up no transfer.
A copy in flight is keyed by the thread running it: the executor calls ``copy_started``,
``copy_progress`` and ``copy_finished`` from the thread that reads the source.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from imagesync.engine import ActionResult, Observer
from imagesync.engine.report import status_document, with_results
from imagesync.model import SiteInventory, format_time
from imagesync.plan import Assessment, Copy

log = structlog.get_logger("imagesync.daemon")

#: transfers shown in the page's recent history
HISTORY_ROWS = 20

HistoryReader = Callable[[int], list[dict[str, Any]]]


@dataclass
class _Flight:
    name: str
    version: str
    source: str
    targets: tuple[str, ...]
    size: int | None
    started: float
    done: int = 0


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else format_time(datetime.fromtimestamp(epoch, UTC))


def _marked_in_flight(assessments: list[Assessment], flights: list[_Flight]) -> list[Assessment]:
    """The assessments with each cell that a running copy targets shown ``in-flight``."""
    flying = {(f.name, t) for f in flights for t in f.targets}
    if not flying:
        return assessments
    return [
        replace(
            a,
            cells={
                s: replace(c, state="in-flight") if (a.name, s) in flying else c
                for s, c in a.cells.items()
            },
        )
        for a in assessments
    ]


class LiveStatus(Observer):
    """The daemon's current state, fed by the pass and the executor, read by the listener."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, history_rows: int = HISTORY_ROWS
    ) -> None:
        self.clock = clock
        self.history_rows = history_rows
        self._lock = threading.Lock()
        self._history_lock = threading.Lock()  # the history cache, shared by handler threads
        self._kinds: dict[str, str] = {}  # site -> "cloud" | "store", in the config's order
        self._inventories: dict[str, SiteInventory] = {}
        self._assessments: list[Assessment] = []
        self._as_of: float | None = None
        self._last_listed: dict[str, datetime] = {}
        self._flights: dict[int, _Flight] = {}
        self._report: dict[str, Any] | None = None
        self._saves: list[dict[str, Any]] = []
        self._coordination: dict[str, Any] | None = None  # None: this host alone
        self._history: HistoryReader | None = None
        self._history_rows: list[dict[str, Any]] = []  # the last read, kept when a read fails

    # -- fed by the pass -----------------------------------------------------------------------
    def observe_plan(
        self,
        kinds: Mapping[str, str],
        inventories: Mapping[str, SiteInventory],
        assessments: Sequence[Assessment],
    ) -> None:
        """A pass listed every site and assessed every name (before it copies anything)."""
        with self._lock:
            self._kinds = dict(kinds)
            self._inventories = dict(inventories)
            self._assessments = list(assessments)
            self._as_of = self.clock()
            for site, inv in inventories.items():
                if inv.ok and inv.listed_at is not None:
                    self._last_listed[site] = inv.listed_at
            # a site no longer configured (reload) is no longer shown
            for site in set(self._last_listed) - set(kinds):
                del self._last_listed[site]

    def observe_saves(self, saves: Sequence[Mapping[str, Any]]) -> None:
        """What the pass's save-on-shutdown step found: one row per marked server
        (:meth:`imagesync.saving.SaveOutcome.as_dict`)."""
        with self._lock:
            self._saves = [dict(s) for s in saves]

    def observe_coordination(self, coordination: Mapping[str, Any] | None) -> None:
        """Several daemons (``coordination:``): the members, who drives how many names, this
        member's health, the uploads in flight in the group
        (:meth:`imagesync.coordination.CoordinationStatus.as_dict`)."""
        with self._lock:
            self._coordination = None if coordination is None else dict(coordination)

    def observe_saving(self, save: Mapping[str, Any]) -> None:
        """A save on shutdown is under way (``state`` saving, ``saving`` says how far): its
        server's row replaces the last pass's until the pass's step ends."""
        with self._lock:
            key = (save.get("cloud"), save.get("server"))
            rows = [s for s in self._saves if (s.get("cloud"), s.get("server")) != key]
            self._saves = [*rows, dict(save)]

    def observe_results(self, results: Sequence[ActionResult]) -> None:
        """The pass's copies ended: the targets they reached are current now."""
        with self._lock:
            self._assessments = with_results(self._assessments, results)

    def observe_report(self, report: Mapping[str, Any]) -> None:
        """The pass's report (:meth:`imagesync.daemon.passes.PassReport.as_dict`)."""
        with self._lock:
            self._report = dict(report)

    def read_history_from(self, reader: HistoryReader | None) -> None:
        """Where recent transfers are read from (the current engine's state database)."""
        with self._lock:
            self._history = reader

    # -- the executor's hooks (transfer threads) -----------------------------------------------
    def copy_started(self, copy: Copy) -> None:
        with self._lock:
            size = self._source_size(copy)
            self._flights[threading.get_ident()] = _Flight(
                name=copy.name,
                version=format_time(copy.version.time),
                source=copy.source_site,
                targets=copy.targets,
                size=size,
                started=self.clock(),
            )

    def copy_progress(self, nbytes: int) -> None:
        with self._lock:
            flight = self._flights.get(threading.get_ident())
            if flight is not None:
                flight.done += nbytes

    def copy_finished(self, result: ActionResult) -> None:
        with self._lock:
            self._flights.pop(threading.get_ident(), None)

    def _source_size(self, copy: Copy) -> int | None:
        inv = self._inventories.get(copy.source_site)
        for rec in inv.images if inv is not None else ():
            if rec.id == copy.source_id:
                return rec.size
        return None

    # -- read by the listener ------------------------------------------------------------------
    def _read_history(self, reader: HistoryReader | None) -> list[dict[str, Any]]:
        if reader is None:
            return self._history_rows
        try:
            rows = reader(self.history_rows)
        except Exception as exc:  # closed by a reload, busy: the page shows the last read
            log.debug("status.history_unavailable", error=str(exc))
            return self._history_rows
        self._history_rows = [
            {**r, "started": _iso(r.get("started")), "finished": _iso(r.get("finished"))}
            for r in rows
        ]
        return self._history_rows

    def document(self) -> dict[str, Any]:
        """Everything the page shows, JSON-ready; ``images``/``unreachable`` as ``status
        --json`` prints them, with the cells a running copy targets shown ``in-flight``."""
        with self._lock:
            kinds = dict(self._kinds)
            inventories = dict(self._inventories)
            assessments = list(self._assessments)
            as_of = self._as_of
            last_listed = dict(self._last_listed)
            flights = [replace(f) for f in self._flights.values()]
            report = dict(self._report) if self._report is not None else None
            saves = [dict(s) for s in self._saves]
            coordination = None if self._coordination is None else dict(self._coordination)
            reader = self._history
        now = self.clock()
        assessments = _marked_in_flight(assessments, flights)
        doc: dict[str, Any] = {
            "generated": _iso(now),
            "as_of": _iso(as_of),
            **status_document(assessments, inventories),
            "sites": {
                site: {
                    "kind": kind,
                    "reachable": inventories[site].ok if site in inventories else None,
                    "error": inventories[site].error if site in inventories else None,
                    "images": len(inventories[site].images) if site in inventories else None,
                    "last_listed": format_time(last_listed[site]) if site in last_listed else None,
                }
                for site, kind in kinds.items()
            },
            "in_flight": [
                {
                    "name": f.name,
                    "version": f.version,
                    "source": f.source,
                    "targets": list(f.targets),
                    "bytes": f.done,
                    "size": f.size,
                    "started": _iso(f.started),
                    "seconds": round(max(0.0, now - f.started), 1),
                }
                for f in sorted(flights, key=lambda f: (f.started, f.name))
            ],
            "last_pass": report,
            "saves": saves,
            "coordination": coordination,
        }
        # its own lock: a read waiting on a busy database must not hold up the transfers
        with self._history_lock:
            doc["history"] = self._read_history(reader)
        return doc
