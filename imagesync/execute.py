"""The executor: takes inventories, runs a plan's actions, records what happened.

This is the only module that changes sites. Copies run under per-(image, site) locks; once a
lock is held the target is listed again (another run may just have finished the same copy, so
a second push transfers nothing) and uploads a crashed run left behind are removed. Retirement
runs only after the newest version is verified on that site (the planner only retires on
sites that are current). Every copy and retirement is one structlog event and one history row.

``execute`` runs a plan's copies one after another, each fanning out to all its targets (one
read of the source): right for ``push`` and ``sync``. ``execute_concurrently`` is the daemon's:
each (image, target) copy is its own task, started as soon as a slot is free overall
(``max_transfers``) and on the site it writes to (that site's ``max_transfers``). A slow or
stuck site so only ever holds its own slots, never delaying copies between other sites: the
source is not charged a slot, because a read stalled by a slow target would otherwise hold
the source's slots too, and no site may take every overall slot. It costs one source read
per target, which is the price of that isolation.

Every upload is a lease in the state database from creation until it is published or removed;
``recover`` removes the uploads of leases (and images marked as uploading) whose lock nobody
holds, which is what a crashed run leaves. An :class:`Observer` hears of each copy and chunk
(the daemon's metrics and watchdog); the engine itself knows nothing of Prometheus.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from imagesync.config.types import Config, ImageRule
from imagesync.errors import ImageSyncError, LockBusy, SiteError
from imagesync.model import ImageRecord, SiteInventory, format_time
from imagesync.plan import Action, Assessment, Copy, Plan, Retire, Rule, Skip
from imagesync.retry import RetryPolicy
from imagesync.sites import open_site
from imagesync.sites.base import Site
from imagesync.state import RecordedCell, State
from imagesync.transfer import CANCELLED, CopyResult, TargetResult, copy_image, new_image_for

log = structlog.get_logger("imagesync.execute")

ProgressFactory = Callable[[str, int | None], Callable[[int], None] | None]
#: concurrent transfers touching a site that has no configured limit (injected test sites)
DEFAULT_SITE_LIMIT = 2


def to_rule(rule: ImageRule) -> Rule:
    return Rule(pattern=rule.pattern, sites=rule.sites, visibility=rule.visibility,
                min_copies=rule.min_copies, keep=rule.keep, retire=rule.retire,
                on_mismatch=rule.on_mismatch)


@dataclass
class ActionResult:
    action: Action
    ok: bool
    detail: str = ""
    copy: CopyResult | None = None
    targets: list[TargetResult] = field(default_factory=list)


#: seconds between full listings of a site that can list changes (deletions by others are
#: noticed then); in between, an idle pass reads only what changed
FULL_LIST_EVERY = 600.0
GONE = frozenset({"deleted", "pending_delete", "killed"})


@dataclass
class _Cached:
    records: dict[str, ImageRecord]
    watermark: str
    full_at: float


class Engine:
    """Sites, state and policy for one process; opens sites lazily and reuses them."""

    def __init__(self, config: Config, state: State | None = None,
                 sites: Mapping[str, Site] | None = None) -> None:
        self.config = config
        self.state = state or State(config.state_dir)
        self._sites: dict[str, Site] = dict(sites or {})
        self._sites_lock = threading.Lock()
        self._cache: dict[str, _Cached] = {}
        self.policy = RetryPolicy(attempts=max(1, config.transfer_retries + 1))

    @property
    def rules(self) -> list[Rule]:
        return [to_rule(r) for r in self.config.images]

    def site(self, name: str) -> Site:
        with self._sites_lock:  # transfer threads open sites too: open each once
            if name not in self._sites:
                self._sites[name] = open_site(self.config, name)
            return self._sites[name]

    @property
    def site_names(self) -> list[str]:
        """The configured sites, or the injected ones when none are configured (tests)."""
        return list(self.config.site_names) or list(self._sites)

    def site_limit(self, name: str) -> int:
        """How many transfers may touch site ``name`` at once."""
        if name in self.config.clouds:
            return max(1, self.config.clouds[name].max_transfers)
        if name in self.config.stores:
            return max(1, self.config.stores[name].max_transfers)
        return DEFAULT_SITE_LIMIT

    def close(self) -> None:
        for s in self._sites.values():
            s.close()

    # -- inventory ---------------------------------------------------------------------------
    def _list(self, site: Site, site_name: str, name: str | None,
              incremental: bool) -> list[ImageRecord]:
        """A site's images: incrementally from the cache when the site can, fully otherwise."""
        if name is not None or not site.capabilities.list_changes:
            return site.list_images(name)
        now = time.monotonic()
        cached = self._cache.get(site_name)
        if incremental and cached is not None and now - cached.full_at < FULL_LIST_EVERY:
            changed, watermark = site.list_changed(cached.watermark)
            records = dict(cached.records)
            for rec in changed:
                if rec.status in GONE:
                    records.pop(rec.id, None)
                else:
                    records[rec.id] = rec
            self._cache[site_name] = _Cached(records, watermark, cached.full_at)
            return list(records.values())
        # A full listing (also the only way to notice images deleted by someone else),
        # then the watermark from which the next pass lists only changes.
        images = site.list_images(None)
        stamps = [r.updated_at or r.created_at for r in images]
        watermark = format_time(max(stamps)) if stamps else ""
        self._cache[site_name] = _Cached({r.id: r for r in images}, watermark, now)
        return images

    def forget(self, site_name: str) -> None:
        """Drop a site's cached listing (after imagesync changed it): the next one is full."""
        self._cache.pop(site_name, None)

    def inventory(self, site_name: str, name: str | None = None,
                  incremental: bool = False) -> SiteInventory:
        try:
            site = self.site(site_name)
            images = self._list(site, site_name, name, incremental)
            in_use = site.images_in_use() if site.capabilities.in_use_check else None
            return SiteInventory(site_name, tuple(images), listed_at=datetime.now(UTC),
                                 in_use=frozenset(in_use) if in_use is not None else None)
        except SiteError as exc:
            log.warning("inventory.failed", site=site_name, error=str(exc))
            self.forget(site_name)
            return SiteInventory(site_name, error=str(exc))

    def inventories(self, sites: Sequence[str] | None = None, name: str | None = None,
                    *, recover: bool = True, incremental: bool = False
                    ) -> dict[str, SiteInventory]:
        """List every site concurrently; one slow or dead site never stalls the others.

        With ``recover`` (not for read-only commands) crash leftovers are removed first.
        With ``incremental`` (the daemon's passes) a site that can list changes since the
        previous pass does so, with a full listing every ``FULL_LIST_EVERY`` seconds.
        """
        names = list(sites) if sites is not None else self.site_names
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            results = pool.map(lambda s: self.inventory(s, name, incremental), names)
            found = {inv.site: inv for inv in results}
        return self.recover(found) if recover else found

    def recover(self, inventories: Mapping[str, SiteInventory]) -> dict[str, SiteInventory]:
        """Remove uploads a crashed run left half-made; return the inventories without them.

        An image still marked ``imagesync.state=uploading`` whose (name, site) lock nobody
        holds is a leftover: no live imagesync is writing it (the kernel frees a dead
        process's locks). One whose lock is held is a copy in flight and stays. Leases whose
        lock nobody holds are leftovers too: the upload they name is removed even when the
        listing did not show it as one.
        """
        removed = self._recover_leases(inventories)
        out: dict[str, SiteInventory] = {}
        for site_name, inv in inventories.items():
            gone = removed.get(site_name, set())
            if not inv.ok or not any(r.in_progress or r.id in gone for r in inv.images):
                out[site_name] = inv
                continue
            kept = []
            for rec in inv.images:
                if rec.id in gone:
                    continue
                if rec.in_progress and self._remove_leftover(site_name, rec.name, rec.id,
                                                             rec.status):
                    continue
                kept.append(rec)
            out[site_name] = dataclasses.replace(inv, images=tuple(kept))
        return out

    def _recover_leases(self, inventories: Mapping[str, SiteInventory]) -> dict[str, set[str]]:
        removed: dict[str, set[str]] = {}
        for lease in self.state.leases():
            inv = inventories.get(lease.site)
            if inv is None or not inv.ok:
                continue  # cannot reach it now: the lease stays for a later pass
            if self._remove_leftover(lease.site, lease.name, lease.image_id, "leased"):
                self.state.drop_lease(lease.site, lease.image_id)
                removed.setdefault(lease.site, set()).add(lease.image_id)
        return removed

    def _remove_leftover(self, site_name: str, name: str, image_id: str, status: str) -> bool:
        try:
            with self.state.lock(name, site_name):
                self.site(site_name).delete(image_id)
            self.forget(site_name)
        except LockBusy:
            return False
        except SiteError as exc:
            log.warning("cleanup.failed", site=site_name, image_id=image_id, error=str(exc))
            return False
        log.warning("cleanup.leftover", site=site_name, image=name, image_id=image_id,
                    status=status)
        return True

    def remove_own_uploads(self) -> int:
        """Delete every upload this process has leased (last resort at shutdown, when a
        transfer thread did not stop in time). Returns how many were removed."""
        count = 0
        for lease in self.state.leases(pid=os.getpid()):
            try:
                self.site(lease.site).delete(lease.image_id)
            except ImageSyncError as exc:
                log.warning("cleanup.failed", site=lease.site, image_id=lease.image_id,
                            error=str(exc))
                continue
            self.state.drop_lease(lease.site, lease.image_id)
            self.forget(lease.site)
            log.warning("cleanup.own_upload", site=lease.site, image=lease.name,
                        image_id=lease.image_id)
            count += 1
        return count

    # -- execution -----------------------------------------------------------------------------
    def execute(self, plan: Plan, progress: ProgressFactory | None = None) -> list[ActionResult]:
        results: list[ActionResult] = []
        for action in plan.actions:
            if isinstance(action, Copy):
                results.append(self.run_copy(action, progress))
        for action in plan.actions:
            if isinstance(action, Retire):
                results.append(self.run_retire(action))
            elif isinstance(action, Skip):
                log.info("skip", image=action.name, site=action.site, reason=action.reason)
        self.record(plan.assessments, results)
        return results

    def execute_concurrently(self, plan: Plan, *, cancel: threading.Event | None = None,
                             observer: Observer | None = None) -> list[ActionResult]:
        """Run the plan with copies in parallel within the overall and per-site limits.

        Each (image, target) is one task. A task starts only when it can take a slot overall
        and on its target at once; it never waits holding a slot, so tasks for a busy site
        wait in the queue while others pass them. Once ``cancel`` is set no task starts, the
        running ones abort (removing their uploads) and retirements are not run.
        """
        observer = observer or Observer()
        tasks = [dataclasses.replace(c, targets=(t,)) for c in plan.copies for t in c.targets]
        order = {id(t): i for i, t in enumerate(tasks)}
        overall = max(1, self.config.max_transfers)
        cond = threading.Condition()
        busy: Counter[str] = Counter()
        running = 0
        done: list[tuple[int, ActionResult]] = []
        pending = list(tasks)

        def sites_of(task: Copy) -> tuple[str]:
            return (task.targets[0],)

        def limit(site: str) -> int:
            # leave one overall slot to the other sites, whatever a site's own limit says
            return max(1, min(self.site_limit(site), overall - 1))

        def work(task: Copy) -> None:
            nonlocal running
            try:
                result = self.run_copy(task, cancel=cancel, observer=observer)
            except Exception as exc:  # a bug must not take the other transfers down
                log.exception("copy.crashed", image=task.name, target=task.targets[0])
                result = ActionResult(task, False, f"unexpected error: {exc}")
            with cond:
                running -= 1
                for s in sites_of(task):
                    busy[s] -= 1
                done.append((order[id(task)], result))
                cond.notify_all()

        with cond:
            while pending or running:
                if cancel is not None and cancel.is_set():
                    pending.clear()
                for task in list(pending):
                    if running >= overall:
                        break
                    if all(busy[s] < limit(s) for s in sites_of(task)):
                        pending.remove(task)
                        running += 1
                        for s in sites_of(task):
                            busy[s] += 1
                        # daemon threads: a transfer stuck in a dead connection must not keep
                        # the process alive after shutdown has cleaned up after it
                        threading.Thread(target=work, args=(task,), daemon=True,
                                         name=f"copy-{task.name[:20]}-{task.targets[0]}").start()
                cond.wait(timeout=0.5)
        results = [r for _, r in sorted(done, key=lambda x: x[0])]
        unreachable: Counter[str] = Counter()
        for action in plan.actions:
            if isinstance(action, Retire):
                if cancel is not None and cancel.is_set():
                    break
                r = self.run_retire(action)
                observer.retire_finished(r)
                results.append(r)
            elif isinstance(action, Skip):
                if action.reason == "site unreachable":
                    unreachable[action.site] += 1  # one line per site, not one per image
                else:
                    log.info("skip", image=action.name, site=action.site, reason=action.reason)
        for site, count in unreachable.items():
            log.warning("skip", site=site, images=count, reason="site unreachable")
        self.record(plan.assessments, results)
        return results

    def run_copy(self, copy: Copy, progress: ProgressFactory | None = None, *,
                 cancel: threading.Event | None = None,
                 observer: Observer | None = None) -> ActionResult:
        if cancel is not None and cancel.is_set():
            return ActionResult(copy, False, CANCELLED)
        started = time.time()
        inner = observer or Observer()
        announced: list[Copy] = []

        class _Once(Observer):
            # copy_finished exactly once for each copy_started, even when the copy raised
            def copy_started(self, c: Copy) -> None:
                announced.append(c)
                inner.copy_started(c)

            def copy_progress(self, nbytes: int) -> None:
                inner.copy_progress(nbytes)

        result = ActionResult(copy, False, "unexpected error")
        try:
            result = self._run_copy(copy, progress, cancel, _Once(), started)
            return result
        finally:
            if announced:
                inner.copy_finished(result)

    def _run_copy(self, copy: Copy, progress: ProgressFactory | None,
                  cancel: threading.Event | None, observer: Observer,
                  started: float) -> ActionResult:
        with ExitStack() as stack:
            targets: list[str] = []
            busy: list[TargetResult] = []
            for t in copy.targets:
                try:
                    stack.enter_context(self.state.lock(copy.name, t))
                except LockBusy as exc:
                    busy.append(TargetResult(site=t, error=str(exc), error_kind="busy"))
                    continue
                if self._already_there(copy, t):
                    log.info("copy.already_current", image=copy.name, site=t)
                    continue
                targets.append(t)
            if not targets:
                ok = not busy
                return ActionResult(copy, ok, "nothing to transfer" if ok else "busy",
                                    targets=busy)
            try:
                source = self.site(copy.source_site)
                image = source.get_image(copy.source_id)
            except SiteError as exc:
                log.error("copy.failed", image=copy.name, source=copy.source_site,
                          error=str(exc))
                return ActionResult(copy, False, str(exc), targets=[
                    TargetResult(site=t, error=str(exc), error_kind="source") for t in targets])
            new = new_image_for(image, copy.version, copy.visibility)
            pairs = [(self.site(t), new) for t in targets]
            bar = progress(f"{copy.name} → {','.join(targets)}", image.size) if progress else None

            def count(n: int) -> None:
                observer.copy_progress(n)
                if bar is not None:
                    bar(n)

            log.info("copy.start", image=copy.name, version=format_time(copy.version.time),
                     source=image.ref, targets=targets, bytes=image.size)
            observer.copy_started(dataclasses.replace(copy, targets=tuple(targets)))
            result = copy_image(source, image, pairs, policy=self.policy, progress=count,
                                cancel=cancel, watcher=_Leases(self.state, copy.name))
            for t in targets:  # imagesync changed these sites: list them fully next time
                self.forget(t)
            close = getattr(bar, "close", None)
            if close is not None:
                close()
        for tr in result.targets:
            self.state.record_transfer(
                started=started, finished=time.time(), name=copy.name, source=image.ref,
                target=tr.site, version=format_time(copy.version.time), sha512=result.sha512,
                bytes=result.bytes_read, seconds=round(result.seconds, 3),
                result="ok" if tr.ok else (tr.error_kind or "failed"),
                image_id=tr.image.id if tr.image else None, error=tr.error)
            if tr.error_kind == CANCELLED:
                log.warning("copy.cancelled", image=copy.name, source=image.ref,
                            target=tr.site, bytes=result.bytes_read)
                continue
            event = log.info if tr.ok else log.error
            event("copy.done" if tr.ok else "copy.failed", image=copy.name, source=image.ref,
                  target=tr.site, image_id=tr.image.id if tr.image else None,
                  bytes=result.bytes_read, seconds=round(result.seconds, 3),
                  error=tr.error, kind=tr.error_kind, attempts=tr.attempts)
        return ActionResult(copy, result.ok and not busy,
                            CANCELLED if result.cancelled else "", copy=result,
                            targets=result.targets + busy)

    def _already_there(self, copy: Copy, target: str) -> bool:
        """Under the lock: is the version there now? Also remove crashed uploads of this name."""
        site = self.site(target)
        try:
            records = site.list_images(copy.name)
        except SiteError:
            return False  # the copy will fail and say why
        for rec in records:
            if rec.in_progress:  # we hold the lock, so nobody is writing it: a crash leftover
                log.warning("cleanup.leftover", site=target, image_id=rec.id, image=copy.name)
                site.delete(rec.id)
                self.forget(target)
        return any(r.counts and not r.hidden and r.version.same_as(copy.version)
                   for r in records)

    def run_retire(self, retire: Retire) -> ActionResult:
        site = self.site(retire.site)
        mode = retire.mode
        if mode == "hide" and not site.capabilities.hide:
            # Deleting is opt-in: a site that cannot hide keeps its old versions.
            log.info("retire.kept", image=retire.name, site=retire.site,
                     image_id=retire.image_id, reason=f"{retire.reason}, but the site cannot "
                     "hide images: set retire: delete on the rule to delete them")
            return ActionResult(retire, True, "kept: the site cannot hide")
        try:
            with self.state.lock(retire.name, retire.site):
                if mode == "hide":
                    site.hide(retire.image_id)
                else:
                    site.delete(retire.image_id)
            self.forget(retire.site)
        except (SiteError, LockBusy) as exc:
            log.error("retire.failed", image=retire.name, site=retire.site,
                      image_id=retire.image_id, error=str(exc))
            return ActionResult(retire, False, str(exc))
        log.info("retire.done", image=retire.name, site=retire.site, image_id=retire.image_id,
                 mode=mode, reason=retire.reason)
        self.state.record_transfer(started=time.time(), finished=time.time(), name=retire.name,
                                   source=f"{retire.site}:{retire.image_id}", target=retire.site,
                                   version=format_time(retire.version.time),
                                   result=f"retired:{mode}", image_id=retire.image_id)
        return ActionResult(retire, True, mode)

    # -- recorded answers ------------------------------------------------------------------------
    def record(self, assessments: Sequence[Assessment], results: Sequence[ActionResult]) -> None:
        now = time.time()
        done: dict[tuple[str, str], ImageRecord] = {}
        for r in results:
            for t in r.targets:
                if t.ok and t.image is not None:
                    done[(r.action.name, t.site)] = t.image
        cells: list[RecordedCell] = []
        for a in assessments:
            newest = format_time(a.newest.time) if a.newest else None
            sha = a.newest.sha512 if a.newest else None
            for site, cell in a.cells.items():
                image = done.get((a.name, site)) or cell.image
                state = "current" if (a.name, site) in done else cell.state
                cells.append(RecordedCell(
                    name=a.name, site=site, state=state, image_id=image.id if image else None,
                    version=format_time(cell.have.time) if cell.have else None,
                    newest=newest, sha512=sha, recorded=now))
        self.state.record_cells(cells)


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


class _Leases:
    """Records each upload of one image name as a lease while it is half-made."""

    def __init__(self, state: State, name: str) -> None:
        self.state = state
        self.name = name

    def started(self, site: str, image_id: str) -> None:
        self.state.add_lease(site, image_id, self.name)

    def ended(self, site: str, image_id: str) -> None:
        self.state.drop_lease(site, image_id)


def summarize(results: Sequence[ActionResult]) -> tuple[int, int]:
    ok = sum(1 for r in results if r.ok)
    return ok, len(results) - ok
