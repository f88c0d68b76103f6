"""The engine: the rooms of execution wired together for one process.

``Engine`` owns a site pool, the inventory (listing cache), recovery, the executor and the
state database, and offers the few calls the commands and the daemon make: list, recover,
run a plan, record what ``check`` answers from. Each room can be used (and tested) alone.

The inventories it hands out carry what the pure planner needs from the state database, as
data: which images imagesync made on each site (the only ones retention may touch) and, on
every record, when imagesync first saw its version (by this process's ``clock``), which is
what orders versions across clouds whose clocks disagree.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from imagesync.config.types import Config, ImageRule
from imagesync.coordination import Coordinator
from imagesync.engine.executor import Executor, ProgressFactory
from imagesync.engine.inventory import Inventory
from imagesync.engine.pool import SitePool
from imagesync.engine.recording import recorded_cells
from imagesync.engine.recovery import Recovery
from imagesync.engine.results import ActionResult, Observer
from imagesync.model import SiteInventory
from imagesync.plan import Assessment, Plan, Retire
from imagesync.retry import RetryPolicy
from imagesync.sites.base import Site
from imagesync.state import State


class Engine:
    """Sites, state and policy for one process; opens sites lazily and reuses them."""

    def __init__(
        self,
        config: Config,
        state: State | None = None,
        sites: Mapping[str, Site] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.state = state or State(config.state_dir)
        self.pool = SitePool(config, sites)
        self.inventory_room = Inventory(
            self.pool,
            full_list_every=config.full_list_interval,
            pass_interval=config.poll_interval,
            managed=lambda name: config.rule_for(name) is not None,
            empty_passes=config.empty_listing_passes,
        )
        self.recovery = Recovery(self.pool, self.state, self.inventory_room)
        self.policy = RetryPolicy(attempts=max(1, config.transfer_retries + 1))
        self.executor = Executor(
            self.pool, self.inventory_room, self.recovery, self.state, self.policy
        )

    @property
    def coordinator(self) -> Coordinator | None:
        return self.executor.coordinator

    def coordinate(self, coordinator: Coordinator | None) -> None:
        """Share the work with other members through ``coordinator`` (imagesync.coordination):
        locks in the service, ownership checked before every side effect."""
        self.executor.coordinator = coordinator
        self.recovery.coordinator = coordinator

    @property
    def rules(self) -> Sequence[ImageRule]:
        return self.config.images

    @property
    def site_names(self) -> list[str]:
        return self.pool.names

    def site(self, name: str) -> Site:
        return self.pool.get(name)

    def close(self) -> None:
        self.pool.close()

    # -- reading -------------------------------------------------------------------------------
    def inventory(
        self, site_name: str, name: str | None = None, incremental: bool = False
    ) -> SiteInventory:
        inv = self.inventory_room.site(site_name, name, incremental)
        return self._with_state({site_name: inv})[site_name]

    def inventories(
        self, *, name: str | None = None, incremental: bool = False
    ) -> dict[str, SiteInventory]:
        """List every site concurrently. Never changes anything (see ``recover``); notes in
        the state database when each version was first seen. (Only the inventory room lists a
        subset of the sites: nothing above the engine has needed one.)"""
        return self._with_state(self.inventory_room.all(None, name, incremental=incremental))

    def _with_state(self, inventories: Mapping[str, SiteInventory]) -> dict[str, SiteInventory]:
        """The inventories with what imagesync made there and when it first saw each version
        (a version never seen before is seen now)."""
        origins = {
            rec.origin
            for inv in inventories.values()
            if inv.ok
            for rec in inv.images
            if rec.counts and inv.trusts(rec)
        }
        seen = {
            origin: datetime.fromtimestamp(t, UTC)
            for origin, t in self.state.first_seen(origins, self.clock()).items()
        }
        made = self.state.made()
        out: dict[str, SiteInventory] = {}
        for site, inv in inventories.items():
            if not inv.ok:
                out[site] = inv
                continue
            images = tuple(
                rec.seen_first(when) if (when := seen.get(rec.origin)) is not None else rec
                for rec in inv.images
            )
            out[site] = dataclasses.replace(inv, images=images, made=made.get(site, frozenset()))
        return out

    def forget(self, site_name: str) -> None:
        self.inventory_room.forget(site_name)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self, inventories: Mapping[str, SiteInventory]) -> dict[str, SiteInventory]:
        """Remove crash leftovers (see ``engine.recovery``); the inventories without them."""
        return self.recovery.recover(inventories)

    def remove_own_uploads(self) -> int:
        return self.recovery.remove_own_uploads()

    # -- execution -----------------------------------------------------------------------------
    def execute(self, plan: Plan, progress: ProgressFactory | None = None) -> list[ActionResult]:
        """``push``/``sync``: copies one after another, each read once for all its targets."""
        if plan.copies:  # copies take long: what the inventory found holds meanwhile
            self.record(plan.assessments)
        results = self.executor.run(plan, progress=progress)
        self.record(plan.assessments, results)
        return results

    def execute_concurrently(
        self, plan: Plan, *, cancel: threading.Event | None = None, observer: Observer | None = None
    ) -> list[ActionResult]:
        """The daemon's: copies in parallel within the limits, each read once for all the
        targets that have a slot (``Executor``). Once ``cancel`` is set no task starts,
        running ones abort (removing their uploads) and retirements are not run."""
        if plan.copies:  # copies take long: what the inventory found holds meanwhile
            self.record(plan.assessments)
        results = self.executor.run(
            plan,
            concurrency=max(1, self.config.max_transfers),
            cancel=cancel,
            observer=observer,
        )
        self.record(plan.assessments, results)
        return results

    def run_retire(self, retire: Retire) -> ActionResult:
        return self.executor.run_retire(retire)

    # -- recorded answers ----------------------------------------------------------------------
    def record(
        self, assessments: Sequence[Assessment], results: Sequence[ActionResult] = ()
    ) -> None:
        """Write what ``check`` answers from. Every inventory calls it (``status`` and a dry
        run too, with no results): a cell it found stale must stop being answered "current"
        at once, not once ``check_max_age`` has passed."""
        self.state.record_cells(recorded_cells(assessments, results, time.time()))
