"""What the executor reports: one result per action, typed outcomes, and the observer hook.

Outcomes are an enum (kopf's ``Reason`` lesson): the daemon's pass summary, the metrics and
the commands' exit codes read ``outcome``, never a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from imagesync.plan import Action, Copy
from imagesync.transfer import CopyResult, TargetResult


class Outcome(StrEnum):
    """How an action ended, as a whole (per-target details are in ``targets``)."""

    DONE = "done"  # copied everywhere asked / retired
    NOTHING_TO_DO = "nothing to do"  # already current on every target
    KEPT = "kept"  # a retirement the site cannot carry out (cannot hide): kept
    BUSY = "busy"  # another imagesync holds a lock it needed
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class ActionResult:
    action: Action
    ok: bool
    detail: str = ""
    copy: CopyResult | None = None
    targets: list[TargetResult] = field(default_factory=list)
    outcome: Outcome = Outcome.DONE


class Observer:
    """What the executor tells a watcher (metrics, watchdog). Every method may be called from
    several transfer threads at once; the defaults do nothing."""

    def copy_started(self, copy: Copy) -> None:
        """A copy of ``copy.name`` to ``copy.targets`` begins (its locks are held)."""

    def copy_progress(self, nbytes: int) -> None:
        """``nbytes`` more were read from a source (a sign of life, too)."""

    def copy_finished(self, result: ActionResult) -> None:
        """The copy that ``copy_started`` announced has ended, well or not."""

    def retire_finished(self, result: ActionResult) -> None:
        """A retirement was done (or failed)."""


def summarize(results: Sequence[ActionResult]) -> tuple[int, int]:
    ok = sum(1 for r in results if r.ok)
    return ok, len(results) - ok
