"""The executor: runs a plan's copies within limits, then its retirements. The only room that
changes sites (besides recovery).

Copies run under per-(image, site) locks; once a lock is held the target is listed again
(another run may just have finished the same copy, so a second push transfers nothing) and
the uploads of that name a crashed run left there are removed (``Recovery.clean_locked``).
Retirement runs only after the newest version is verified on that site (the planner only
retires on sites that are current). Every copy and retirement is one structlog event and one
history row.

One scheduler serves every caller. ``push`` and ``sync`` run a plan's copies one after
another in the calling thread (so Ctrl-C unwinds through them and their cleanup), each
fanning out to all its targets from one read of the source. The daemon runs copies
concurrently, also each fanning out from one read: a copy starts only when it can take a
slot overall (``max_transfers``: one per copy, that is per read of a source) and one on
every site it writes to (that site's ``max_transfers``). A copy whose targets are only
partly free is split, not held back: the free targets start now from one read, the others
wait as a copy of their own (a second read of the source, which is cheaper than a fast
site idling behind a slow one). No task waits holding a slot, so copies for a busy site
wait while others pass them. The source is not charged a slot (a read stalled by a slow
target would otherwise hold the source's slots too), and no site may take every overall
slot.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import structlog

from imagesync.convert import Scratch, copy_with_formats
from imagesync.coordination import Coordinator, locked
from imagesync.engine.history import (
    Leases,
    record_copy,
    record_retired,
    record_unfinished,
    retire_log,
)
from imagesync.engine.inventory import Inventory
from imagesync.engine.marker import UploadMarker
from imagesync.engine.pool import SitePool
from imagesync.engine.recovery import Recovery
from imagesync.engine.results import ActionResult, Observer, Outcome
from imagesync.engine.serverside import copy_image
from imagesync.errors import LockBusy, LockDenied, SiteError
from imagesync.logs import OncePerState
from imagesync.model import PROP_BOOT_TEST, PROP_UPLOAD, ImageRecord, NewImage, format_time
from imagesync.plan import BOOT_TEST_PENDING, Copy, Plan, Retire, SkipReason
from imagesync.retry import RetryPolicy
from imagesync.sites.base import Site
from imagesync.state import State
from imagesync.transfer import CopyResult, ErrorKind, TargetResult, new_image_for
from imagesync.uploads import Paces, Tuning

log = structlog.get_logger("imagesync.execute")

ProgressFactory = Callable[[str, int | None], Callable[[int], None] | None]


@dataclasses.dataclass(eq=False)  # eq=False: one executor is one executor (identity, hashable)
class Executor:
    """Runs plans against the pool's sites, recording history and leases in ``state``."""

    pool: SitePool
    inventory: Inventory
    recovery: Recovery
    state: State
    policy: RetryPolicy
    #: the wall clock upload markers are written in
    clock: Callable[[], float] = time.time
    #: several daemons sharing the work: locks in the service, ownership checked before
    #: each side effect (None: this host alone, local locks)
    coordinator: Coordinator | None = dataclasses.field(default=None, init=False)
    # the daemon meets the same skips and kept retirements every pass: info once per
    # change, debug otherwise
    _said: OncePerState = dataclasses.field(default_factory=OncePerState, init=False, repr=False)
    # each target's speed as this process's copies saw it: one known to be much slower
    # than the others gets its own read of the source from the start (imagesync.fanout)
    tuning: Tuning = dataclasses.field(
        default_factory=lambda: Tuning(paces=Paces()), init=False, repr=False
    )

    def run(
        self,
        plan: Plan,
        *,
        concurrency: int = 1,
        split_targets: bool = False,
        progress: ProgressFactory | None = None,
        cancel: threading.Event | None = None,
        observer: Observer | None = None,
    ) -> list[ActionResult]:
        """Run the copies (``concurrency`` at a time), then, unless cancelled, retirements.

        ``split_targets`` makes one task per (copy, target) from the start: every target
        then reads the source on its own (kept for measuring what grouping saves)."""
        observer = observer or Observer()
        copies = plan.copies
        if split_targets:
            copies = [dataclasses.replace(c, targets=(t,)) for c in copies for t in c.targets]
        if concurrency <= 1:
            results = [self.run_copy(c, progress, cancel=cancel, observer=observer) for c in copies]
        else:
            results = self._run_concurrently(copies, concurrency, cancel, observer)
        return results + self._retire_and_report(plan, cancel, observer)

    def _run_concurrently(
        self,
        tasks: Sequence[Copy],
        overall: int,
        cancel: threading.Event | None,
        observer: Observer,
    ) -> list[ActionResult]:
        cond = threading.Condition()
        busy: Counter[str] = Counter()
        running = 0
        done: list[tuple[int, ActionResult]] = []
        pending = list(enumerate(tasks))

        def limit(site: str) -> int:
            # leave one overall slot to the other sites, whatever a site's own limit says
            return max(1, min(self.pool.limit(site), overall - 1))

        def work(index: int, task: Copy) -> None:
            nonlocal running
            try:
                result = self.run_copy(task, cancel=cancel, observer=observer)
            except Exception as exc:  # a bug must not take the other transfers down
                log.exception("copy.crashed", image=task.name, targets=list(task.targets))
                result = ActionResult(
                    task, False, f"unexpected error: {exc}", outcome=Outcome.FAILED
                )
            with cond:
                running -= 1
                busy.subtract(task.targets)
                done.append((index, result))
                cond.notify_all()

        with cond:
            while pending or running:
                if cancel is not None and cancel.is_set():
                    pending.clear()
                waiting: list[tuple[int, Copy]] = []
                for index, task in pending:
                    free = tuple(s for s in task.targets if busy[s] < limit(s))
                    if running >= overall or not free:
                        waiting.append((index, task))
                        continue
                    if len(free) < len(task.targets):
                        # the targets at their site's limit wait, in the same place in line
                        rest = tuple(s for s in task.targets if s not in free)
                        waiting.append((index, dataclasses.replace(task, targets=rest)))
                        task = dataclasses.replace(task, targets=free)
                    running += 1
                    busy.update(task.targets)
                    # daemon threads: a transfer stuck in a dead connection must not keep
                    # the process alive after shutdown has cleaned up after it
                    threading.Thread(
                        target=work,
                        args=(index, task),
                        daemon=True,
                        name=f"copy-{task.name[:20]}-{task.targets[0]}",
                    ).start()
                pending = waiting
                cond.wait(timeout=0.5)
        return [r for _, r in sorted(done, key=lambda x: x[0])]

    def _retire_and_report(
        self, plan: Plan, cancel: threading.Event | None, observer: Observer
    ) -> list[ActionResult]:
        results: list[ActionResult] = []
        if not (cancel is not None and cancel.is_set()):
            for retire in plan.retires:
                if cancel is not None and cancel.is_set():
                    break
                r = self.run_retire(retire)
                observer.retire_finished(r)
                results.append(r)
        unreachable: Counter[str] = Counter()
        seen: list[tuple[str, ...]] = [_kept_key(r) for r in plan.retires]
        for skip in plan.skips:
            if skip.why is SkipReason.UNREACHABLE:
                unreachable[skip.site] += 1  # one line per site, not one per image
                continue
            # one name and site may have several (one per version kept): the reason is the fact
            seen.append(key := ("skip", skip.name, skip.site, skip.reason))
            event = log.info if self._said.changed(key, True) else log.debug
            event("skip", image=skip.name, site=skip.site, reason=skip.reason)
        for site, count in unreachable.items():
            seen.append(site_key := ("skip", site))
            event = log.warning if self._said.changed(site_key, "unreachable") else log.debug
            event("skip", site=site, images=count, reason=SkipReason.UNREACHABLE.value)
        self._said.keep_only(seen)
        return results

    # -- one copy ------------------------------------------------------------------------------
    def run_copy(
        self,
        copy: Copy,
        progress: ProgressFactory | None = None,
        *,
        cancel: threading.Event | None = None,
        observer: Observer | None = None,
    ) -> ActionResult:
        """Copy the newest version to ``copy.targets`` (those not current already)."""
        if cancel is not None and cancel.is_set():
            return ActionResult(copy, False, "cancelled", outcome=Outcome.CANCELLED)
        inner = observer or Observer()
        announced: list[Copy] = []

        class _Once(Observer):
            # copy_finished exactly once for each copy_started, even when the copy raised
            def copy_started(self, c: Copy) -> None:
                announced.append(c)
                inner.copy_started(c)

            def copy_progress(self, nbytes: int) -> None:
                inner.copy_progress(nbytes)

        result = ActionResult(copy, False, "unexpected error", outcome=Outcome.FAILED)
        try:
            with ExitStack() as locks:
                targets, busy = self._lock_targets(copy, locks)
                if not targets:
                    failed = _failed(busy)
                    if not busy:
                        detail, outcome = "nothing to transfer", Outcome.NOTHING_TO_DO
                    elif failed:
                        detail, outcome = failed[0].error or "lock denied", Outcome.FAILED
                    else:
                        detail, outcome = "busy", Outcome.BUSY
                    result = ActionResult(copy, not busy, detail, targets=busy, outcome=outcome)
                    return result
                result = self._copy_locked(copy, targets, busy, progress, cancel, _Once())
            return result
        finally:
            if announced:
                inner.copy_finished(result)

    def _lock_targets(self, copy: Copy, locks: ExitStack) -> tuple[list[str], list[TargetResult]]:
        """Take each target's lock; keep the targets that still lack the version."""
        targets: list[str] = []
        busy: list[TargetResult] = []
        for t in copy.targets:
            try:
                locks.enter_context(locked(self.state, self.coordinator, copy.name, t))
            except LockDenied as exc:
                # Not someone else's turn but a broken lock file: a failure of this (name,
                # site) alone, reported with its path and fix; the other targets go on.
                log.error("copy.lock_denied", image=copy.name, site=t, error=str(exc))
                busy.append(TargetResult(site=t, error=str(exc), error_kind=ErrorKind.SITE))
                continue
            except LockBusy as exc:
                busy.append(TargetResult(site=t, error=str(exc), error_kind=ErrorKind.BUSY))
                continue
            if self._current_on(copy, t):
                log.info("copy.already_current", image=copy.name, site=t)
                continue
            targets.append(t)
        return targets, busy

    def _current_on(self, copy: Copy, target: str) -> bool:
        """Under the lock: is the version there now? Its crash leftovers are removed first."""
        try:
            site = self.pool.get(target)
            owners = site.capabilities.trusted_owners
            trusted = owners() if owners is not None else None
            # another project's images neither count as the copy nor are leftovers of ours
            records = [
                r for r in site.list_images(copy.name) if trusted is None or r.owner in trusted
            ]
            records = self.recovery.clean_locked(target, copy.name, records)
        except SiteError:
            return False  # the copy will fail and say why
        return any(r.counts and not r.hidden and r.version.same_as(copy.version) for r in records)

    def _copy_locked(
        self,
        copy: Copy,
        targets: list[str],
        busy: list[TargetResult],
        progress: ProgressFactory | None,
        cancel: threading.Event | None,
        observer: Observer,
    ) -> ActionResult:
        started = time.time()
        targets, busy = self._still_ours(copy, targets, busy)
        if not targets:
            return ActionResult(copy, False, "busy", targets=busy, outcome=Outcome.BUSY)
        try:
            source = self.pool.get(copy.source_site)
            image = source.get_image(copy.source_id)
        except SiteError as exc:
            return self._source_failed(copy, targets, busy, started, exc)
        new, marker = self._upload_for(copy, image)
        counter = _Counter(progress, observer, copy, targets, image.size)
        coord = self.coordinator

        def lease_expired() -> bool:
            # before publishing: the marker's lease, and (coordinated) every lock still ours
            if self.clock() >= marker.expires:
                return True
            return coord is not None and not all(coord.holds(copy.name, t) for t in targets)

        log.info(
            "copy.start",
            image=copy.name,
            version=format_time(copy.version.time),
            source=image.ref,
            targets=targets,
            bytes=image.size,
        )
        observer.copy_started(dataclasses.replace(copy, targets=tuple(targets)))
        result = self._transfer(
            copy,
            source,
            image,
            targets,
            new,
            started,
            counter,
            cancel,
            lease_expired,
        )
        record_copy(self.state, copy, image, result, started)
        if copy.hidden:
            self._hide_published(copy, result)
        return _copied(copy, result, busy)

    def _still_ours(
        self, copy: Copy, targets: list[str], busy: list[TargetResult]
    ) -> tuple[list[str], list[TargetResult]]:
        """Coordinated, before creating anything: the targets whose lock is still ours; the
        others join ``busy`` (lock lost)."""
        coord = self.coordinator
        if coord is None:
            return targets, busy
        lost = [t for t in targets if not coord.holds(copy.name, t)]
        busy = busy + [
            TargetResult(site=t, error="lock lost", error_kind=ErrorKind.BUSY) for t in lost
        ]
        return [t for t in targets if t not in lost], busy

    def _source_failed(
        self,
        copy: Copy,
        targets: list[str],
        busy: list[TargetResult],
        started: float,
        exc: SiteError,
    ) -> ActionResult:
        """The source image could not be read: every target fails as ``source``."""
        log.error("copy.failed", image=copy.name, source=copy.source_site, error=str(exc))
        # history shows the transfers that never got going too
        record_unfinished(
            self.state,
            copy,
            f"{copy.source_site}:{copy.source_id}",
            targets,
            started,
            0,
            ErrorKind.SOURCE.value,
            str(exc),
        )
        failed = [
            TargetResult(site=t, error=str(exc), error_kind=ErrorKind.SOURCE) for t in targets
        ]
        return ActionResult(copy, False, str(exc), outcome=Outcome.FAILED, targets=failed + busy)

    def _upload_for(self, copy: Copy, image: ImageRecord) -> tuple[NewImage, UploadMarker]:
        """What each target's upload is created as, and the lease marker it carries."""
        new = new_image_for(image, copy.version, copy.visibility)
        # Name this instance as the uploads' owner, so that another one leaves them alone
        # until the lease expires (engine.marker); the copy never publishes after that.
        marker = UploadMarker.new(self.state.instance_id, self.clock(), image.size)
        extra = {PROP_BOOT_TEST: BOOT_TEST_PENDING} if copy.hidden else {}
        new = dataclasses.replace(
            new, properties={**new.properties, **extra, PROP_UPLOAD: marker.to_property()}
        )
        return new, marker

    def _transfer(
        self,
        copy: Copy,
        source: Site,
        image: ImageRecord,
        targets: list[str],
        new: NewImage,
        started: float,
        counter: _Counter,
        cancel: threading.Event | None,
        lease_expired: Callable[[], bool],
    ) -> CopyResult:
        """The copy itself; history records it even when Ctrl-C interrupts it."""
        interrupted = False
        try:
            # converted where a target wants another format (imagesync.convert); the rest
            # server-side where the sites allow it (engine.serverside), else relayed
            return copy_with_formats(
                source,
                image,
                [(self.pool.get(t), new) for t in targets],
                accepted=self._disk_formats,
                scratch=self._scratch(),
                policy=self.policy,
                progress=counter,
                cancel=cancel,
                watcher=Leases(self.state, copy.name, self.coordinator),
                lease_expired=lease_expired,
                # a copy whose targets fall behind keeps its read in the scratch directory
                tuning=dataclasses.replace(self.tuning, spool_room=self._scratch().spool),
                plain_copy=copy_image,
            )
        except KeyboardInterrupt:
            # Ctrl-C (SIGTERM for the CLI) in push or sync: copy_image aborted every upload
            # before this; history must still show the transfer (`history` lists it)
            interrupted = True
            record_unfinished(
                self.state,
                copy,
                image.ref,
                targets,
                started,
                counter.read,
                "interrupted",
                "interrupted (Ctrl-C or SIGTERM): the upload was removed",
            )
            raise
        finally:
            for t in targets:  # imagesync changed these sites: list them fully next time
                self.inventory.forget(t)
            counter.close(interrupted)
            if interrupted:
                # after the bar has ended its line; info: the person who pressed Ctrl-C reads
                # the bar's own sentence, a log reader (JSON, not a terminal) this
                log.bind(image=copy.name, source=image.ref).info(
                    "copy.interrupted", targets=targets, bytes=counter.read, uploads="removed"
                )

    def _disk_formats(self, site: str) -> tuple[str, ...]:
        """The formats ``site`` accepts, preferred first; () takes any as it is."""
        cloud = self.pool.config.clouds.get(site)
        return cloud.disk_formats if cloud is not None else ()

    def _scratch(self) -> Scratch:
        conv = self.pool.config.conversion
        return Scratch(conv.directory(self.pool.config.state_dir), conv.scratch_max_size)

    def _hide_published(self, copy: Copy, result: CopyResult) -> None:
        """A boot test's copy (``Copy.hidden``) is hidden as soon as it is published, under
        the copy's lock; it carries ``imagesync.boot-test=pending`` from its creation, so even
        if this fails (logged), the planner never counts it as the version having spread."""
        for t in result.targets:
            hide = self.pool.get(t.site).capabilities.hide
            if not t.ok or t.image is None or hide is None:
                continue
            try:
                hide(t.image.id)
                t.image = t.image.with_(hidden=True)
            except SiteError as exc:
                log.warning("copy.hide_failed", image=copy.name, site=t.site, error=str(exc))

    # -- one retirement ------------------------------------------------------------------------
    def run_retire(self, retire: Retire) -> ActionResult:
        site = self.pool.get(retire.site)
        hide = site.capabilities.hide
        if retire.mode == "hide" and hide is None:
            # Deleting is opt-in: a site that cannot hide keeps its old versions.
            fix = "the site cannot hide images: set retire: delete on the rule to delete them"
            return self._kept(retire, "cannot hide", detail="the site cannot hide", reason=fix)
        try:
            with locked(self.state, self.coordinator, retire.name, retire.site):
                mode, why = self._retire_mode(retire, site)
                if self.coordinator is not None and not self.coordinator.holds(
                    retire.name, retire.site
                ):
                    raise LockBusy(f"{retire.name} on {retire.site}: lock lost")
                if mode == "keep":
                    return self._kept(retire, why)
                if mode == "hide":
                    assert hide is not None
                    hide(retire.image_id)
                else:
                    site.delete(retire.image_id)
            self.inventory.forget(retire.site)
        except (SiteError, LockBusy) as exc:
            retire_log(retire).error("retire.failed", error=str(exc))
            return ActionResult(retire, False, str(exc), outcome=Outcome.FAILED)
        return record_retired(self.state, retire, mode, why)

    def _kept(
        self,
        retire: Retire,
        why: str | None,
        *,
        detail: str | None = None,
        reason: str | None = None,
    ) -> ActionResult:
        """The old version stays: logged (info when ``why`` changes, else debug) with ``reason``,
        ``kept: detail`` in the result (both ``why`` unless given)."""
        self._kept_log(retire, why)("retire.kept", reason=f"{retire.reason}, but {reason or why}")
        return ActionResult(retire, True, f"kept: {detail or why}", outcome=Outcome.KEPT)

    def _kept_log(self, retire: Retire, why: str | None) -> Callable[..., Any]:
        """info the first time (or when why changes), debug every pass after that."""
        rlog = retire_log(retire)
        event: Callable[..., Any] = (
            rlog.info if self._said.changed(_kept_key(retire), why) else rlog.debug
        )
        return event

    def _retire_mode(self, retire: Retire, site: Site) -> tuple[str, str | None]:
        """Under the lock: how to retire (``hide``, ``delete`` or ``keep``), and why not as
        the rule says. Deleting an image a server uses breaks its rebuild, evacuation and
        cold migration, so ``delete`` asks the site now (a server may have booted since the
        plan) and, when the site cannot tell, hides instead."""
        if retire.mode != "delete":
            return retire.mode, None
        in_use = site.capabilities.images_in_use
        ids = in_use() if in_use is not None else None
        if ids is not None and retire.image_id in ids:
            return "keep", "a server uses it"
        if ids is not None:
            return "delete", None
        why = (
            "the site cannot tell which images servers use"
            if in_use is None
            else "the site cannot tell now which images servers use (its in_use log says why)"
        )
        if site.capabilities.hide is None:
            return "keep", f"{why}, and it cannot hide images"
        return "hide", why


def _kept_key(retire: Retire) -> tuple[str, ...]:
    return ("retire.kept", retire.site, retire.image_id)


def _copied(copy: Copy, result: CopyResult, busy: list[TargetResult]) -> ActionResult:
    """The action's result from the copy's and the targets that were busy."""
    outcome = (
        Outcome.CANCELLED
        if result.cancelled
        else Outcome.DONE
        if result.ok and not busy
        else Outcome.BUSY
        if result.ok and not _failed(busy)
        else Outcome.FAILED
    )
    return ActionResult(
        copy,
        result.ok and not busy,
        "cancelled" if result.cancelled else "",
        copy=result,
        targets=result.targets + busy,
        outcome=outcome,
    )


class _Counter:
    """The copy's progress: bytes read, told to the observer and the progress bar."""

    def __init__(
        self,
        progress: ProgressFactory | None,
        observer: Observer,
        copy: Copy,
        targets: Sequence[str],
        size: int | None,
    ) -> None:
        self.read = 0
        self.observer = observer
        self.bar = progress(f"{copy.name} → {','.join(targets)}", size) if progress else None

    def __call__(self, n: int) -> None:
        self.read += n
        self.observer.copy_progress(n)
        if self.bar is not None:
            self.bar(n)

    def close(self, interrupted: bool) -> None:
        close = getattr(self.bar, "close", None)
        if close is not None:
            close(interrupted=interrupted)


def _failed(blocked: list[TargetResult]) -> list[TargetResult]:
    """The targets whose lock could not be taken for a reason that counts as a failure."""
    return [t for t in blocked if t.error_kind is not None and t.error_kind.counts_as_failure]
