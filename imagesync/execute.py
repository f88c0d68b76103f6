"""The executor: takes inventories, runs a plan's actions, records what happened.

This is the only module that changes sites. Copies run under per-(image, site) locks; once a
lock is held the target is listed again (another run may just have finished the same copy, so
a second push transfers nothing) and uploads a crashed run left behind are removed. Retirement
runs only after the newest version is verified on that site (the planner only retires on
sites that are current). Every copy and retirement is one structlog event and one history row.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from imagesync.config import Config, ImageRule
from imagesync.errors import LockBusy, SiteError
from imagesync.model import ImageRecord, SiteInventory, format_time
from imagesync.plan import Action, Assessment, Copy, Plan, Retire, Rule, Skip
from imagesync.retry import RetryPolicy
from imagesync.sites import open_site
from imagesync.sites.base import Site
from imagesync.state import RecordedCell, State
from imagesync.transfer import CopyResult, TargetResult, copy_image, new_image_for

log = structlog.get_logger("imagesync.execute")

ProgressFactory = Callable[[str, int | None], Callable[[int], None] | None]


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


class Engine:
    """Sites, state and policy for one process; opens sites lazily and reuses them."""

    def __init__(self, config: Config, state: State | None = None,
                 sites: Mapping[str, Site] | None = None) -> None:
        self.config = config
        self.state = state or State(config.state_dir)
        self._sites: dict[str, Site] = dict(sites or {})
        self.policy = RetryPolicy(attempts=max(1, config.transfer_retries + 1))

    @property
    def rules(self) -> list[Rule]:
        return [to_rule(r) for r in self.config.images]

    def site(self, name: str) -> Site:
        if name not in self._sites:
            self._sites[name] = open_site(self.config, name)
        return self._sites[name]

    def close(self) -> None:
        for s in self._sites.values():
            s.close()

    # -- inventory ---------------------------------------------------------------------------
    def inventory(self, site_name: str, name: str | None = None) -> SiteInventory:
        try:
            site = self.site(site_name)
            images = site.list_images(name)
            in_use = site.images_in_use() if site.capabilities.in_use_check else None
            return SiteInventory(site_name, tuple(images), listed_at=datetime.now(UTC),
                                 in_use=frozenset(in_use) if in_use is not None else None)
        except SiteError as exc:
            log.warning("inventory.failed", site=site_name, error=str(exc))
            return SiteInventory(site_name, error=str(exc))

    def inventories(self, sites: Sequence[str] | None = None, name: str | None = None,
                    *, recover: bool = True) -> dict[str, SiteInventory]:
        """List every site concurrently; one slow or dead site never stalls the others.

        With ``recover`` (not for read-only commands) crash leftovers are removed first.
        """
        names = list(sites) if sites is not None else list(self.config.site_names)
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            results = pool.map(lambda s: self.inventory(s, name), names)
            found = {inv.site: inv for inv in results}
        return self.recover(found) if recover else found

    def recover(self, inventories: Mapping[str, SiteInventory]) -> dict[str, SiteInventory]:
        """Remove uploads a crashed run left half-made; return the inventories without them.

        An image still marked ``imagesync.state=uploading`` whose (name, site) lock nobody
        holds is a leftover: no live imagesync is writing it (the kernel frees a dead
        process's locks). One whose lock is held is a copy in flight and stays.
        """
        out: dict[str, SiteInventory] = {}
        for site_name, inv in inventories.items():
            if not inv.ok or not any(r.in_progress for r in inv.images):
                out[site_name] = inv
                continue
            kept = []
            for rec in inv.images:
                if rec.in_progress and self._remove_leftover(site_name, rec):
                    continue
                kept.append(rec)
            out[site_name] = dataclasses.replace(inv, images=tuple(kept))
        return out

    def _remove_leftover(self, site_name: str, rec: ImageRecord) -> bool:
        try:
            with self.state.lock(rec.name, site_name):
                self.site(site_name).delete(rec.id)
        except LockBusy:
            return False
        except SiteError as exc:
            log.warning("cleanup.failed", site=site_name, image_id=rec.id, error=str(exc))
            return False
        log.warning("cleanup.leftover", site=site_name, image=rec.name, image_id=rec.id,
                    status=rec.status)
        return True

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

    def run_copy(self, copy: Copy, progress: ProgressFactory | None = None) -> ActionResult:
        started = time.time()
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
            log.info("copy.start", image=copy.name, version=format_time(copy.version.time),
                     source=image.ref, targets=targets, bytes=image.size)
            result = copy_image(source, image, pairs, policy=self.policy, progress=bar)
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
            event = log.info if tr.ok else log.error
            event("copy.done" if tr.ok else "copy.failed", image=copy.name, source=image.ref,
                  target=tr.site, image_id=tr.image.id if tr.image else None,
                  bytes=result.bytes_read, seconds=round(result.seconds, 3),
                  error=tr.error, kind=tr.error_kind, attempts=tr.attempts)
        return ActionResult(copy, result.ok and not busy, copy=result,
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
        return any(r.counts and not r.hidden and r.version.same_as(copy.version)
                   for r in records)

    def run_retire(self, retire: Retire) -> ActionResult:
        site = self.site(retire.site)
        mode = retire.mode if (retire.mode == "delete" or site.capabilities.hide) else "delete"
        try:
            with self.state.lock(retire.name, retire.site):
                if mode == "hide":
                    site.hide(retire.image_id)
                else:
                    site.delete(retire.image_id)
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
        for a in assessments:
            newest = format_time(a.newest.time) if a.newest else None
            sha = a.newest.sha512 if a.newest else None
            for site, cell in a.cells.items():
                image = done.get((a.name, site)) or cell.image
                state = "current" if (a.name, site) in done else cell.state
                self.state.record_cell(RecordedCell(
                    name=a.name, site=site, state=state, image_id=image.id if image else None,
                    version=format_time(cell.have.time) if cell.have else None,
                    newest=newest, sha512=sha, recorded=now))


def summarize(results: Sequence[ActionResult]) -> tuple[int, int]:
    ok = sum(1 for r in results if r.ok)
    return ok, len(results) - ok
