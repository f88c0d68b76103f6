"""The executor's history and leases: one history row (``state.record_transfer``) and one log
line per target of every copy, also of one that ended without a result (its source unreadable,
or Ctrl-C), and per retirement; and the leases of the uploads a copy has half-made
(``Leases``: recorded from an upload's creation until it is published or removed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import structlog

from imagesync.coordination import Coordinator
from imagesync.engine.results import ActionResult
from imagesync.model import ImageRecord, format_time
from imagesync.plan import Copy, Retire
from imagesync.state import State
from imagesync.transfer import CopyResult, ErrorKind

# the executor's events keep the logger they always had
log = structlog.get_logger("imagesync.execute")


def record_unfinished(
    state: State,
    copy: Copy,
    source: str,
    targets: Sequence[str],
    started: float,
    nbytes: int,
    result: str,
    error: str,
) -> None:
    """One history row per target of a copy that ended without a CopyResult."""
    now = time.time()
    for t in targets:
        state.record_transfer(
            started=started,
            finished=now,
            name=copy.name,
            source=source,
            target=t,
            version=format_time(copy.version.time),
            bytes=nbytes,
            seconds=round(now - started, 3),
            result=result,
            error=error,
        )


def record_copy(
    state: State, copy: Copy, image: ImageRecord, result: CopyResult, started: float
) -> None:
    """One history row and one log line per target of a copy that returned a result."""
    clog = log.bind(image=copy.name, source=image.ref)  # every line names the copy
    for tr in result.targets:
        if tr.ok and tr.image is not None:
            # what retention may touch one day (already recorded when the upload began,
            # by Leases.started; idempotent)
            state.record_made(tr.site, tr.image.id, copy.name)
        state.record_transfer(
            started=started,
            finished=time.time(),
            name=copy.name,
            source=image.ref,
            target=tr.site,
            version=format_time(copy.version.time),
            sha512=result.sha512,
            bytes=result.bytes_read,
            seconds=round(result.seconds, 3),
            result="ok" if tr.ok else (tr.error_kind.value if tr.error_kind else "failed"),
            image_id=tr.image.id if tr.image else None,
            error=tr.error,
        )
        if tr.error_kind is ErrorKind.CANCELLED:
            clog.warning("copy.cancelled", target=tr.site, bytes=result.bytes_read)
            continue
        event = clog.info if tr.ok else clog.error
        event(
            "copy.done" if tr.ok else "copy.failed",
            target=tr.site,
            image_id=tr.image.id if tr.image else None,
            bytes=result.bytes_read,
            seconds=round(result.seconds, 3),
            error=tr.error,
            kind=tr.error_kind.value if tr.error_kind else None,
            attempts=tr.attempts,
        )


def retire_log(retire: Retire) -> Any:
    """The logger of one retirement: every line names the image, the site and the image's id."""
    return log.bind(image=retire.name, site=retire.site, image_id=retire.image_id)


def record_retired(state: State, retire: Retire, mode: str, why: str | None) -> ActionResult:
    """The old version was hidden or deleted: logged and recorded in history."""
    detail = mode if why is None else f"{mode} instead of delete: {why}"
    retire_log(retire).info("retire.done", mode=mode, reason=retire.reason, fallback=why)
    state.record_transfer(
        started=time.time(),
        finished=time.time(),
        name=retire.name,
        source=f"{retire.site}:{retire.image_id}",
        target=retire.site,
        version=format_time(retire.version.time),
        result=f"retired:{mode}",
        image_id=retire.image_id,
        error=None if why is None else f"hidden instead of deleted: {why}",
    )
    return ActionResult(retire, True, detail)


class Leases:
    """Records each upload of one image name as a lease while it is half-made."""

    def __init__(self, state: State, name: str, coordinator: Coordinator | None = None) -> None:
        self.state = state
        self.name = name
        self.coordinator = coordinator

    def started(self, site: str, image_id: str) -> None:
        # Made by imagesync from its creation, not from the end of the copy: a kill -9 after
        # publish() but before the copy returns (a fan-out still writing its other targets)
        # would otherwise leave a published copy that retention never retires. Retention
        # only looks at published images, so the id of an upload that never publishes is
        # harmless here (found by the fault suite, tests/faults.py).
        self.state.record_made(site, image_id, self.name)
        self.state.add_lease(site, image_id, self.name)
        if self.coordinator is not None:  # who makes what where, for every member to see
            self.coordinator.record_upload(self.name, site, image_id)

    def ended(self, site: str, image_id: str) -> None:
        self.state.drop_lease(site, image_id)
        if self.coordinator is not None:
            self.coordinator.drop_upload(site, image_id)
