"""The rooms of execution, below the commands and the daemon, above the planner and transfer.

- ``pool``: each site opened once, and its transfer limit;
- ``inventory``: listings (concurrent, incremental, cached); reads never delete;
- ``recovery``: removing crash leftovers, only where called by name;
- ``executor``: runs a plan's copies within limits, then its retirements;
- ``history``: the executor's history rows, log lines and upload leases;
- ``recording``: what ``check`` answers from, a pure function of plan + results;
- ``report``: what ``status --json`` and the daemon's ``/status.json`` show (one function);
- ``results``: typed outcomes and the observer hook;
- ``facade``: ``Engine``, the rooms wired together for one process.

The flow is inventory → plan (``imagesync.plan``, pure) → execute → record.
"""

from imagesync.engine.executor import ProgressFactory
from imagesync.engine.facade import Engine
from imagesync.engine.inventory import FULL_LIST_EVERY
from imagesync.engine.results import ActionResult, Observer, Outcome, summarize

__all__ = [
    "FULL_LIST_EVERY",
    "ActionResult",
    "Engine",
    "Observer",
    "Outcome",
    "ProgressFactory",
    "summarize",
]
