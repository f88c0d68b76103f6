"""The inventory: what every site holds, listed concurrently, with an incremental cache.

Reading never changes a site: crash leftovers show up in a listing as ``in_progress``
records and are removed only where ``recovery`` is called by name.

A site that can list only what changed since a watermark is listed fully once, then
incrementally on the daemon's passes, and fully again after imagesync changed it (``forget``)
and on the last pass before ``full_list_every`` seconds have gone by since its previous full
listing (the only way to notice images deleted by someone else: so they are noticed within
``full_list_every``, the configuration's ``full_list_interval``, given passes every
``pass_interval``).

A listing is not believed just because it succeeded. A site that listed images of managed
names and now, in a whole-site listing, lists none (credentials rotated to another project, a
Glance behind a broken proxy) is reported failed, "suspect", so that nothing is copied to it
again nor retired elsewhere because of it, until it has listed none ``empty_passes`` times in
a row. The memory of what a site listed lives as long as this object (the daemon's engine):
restarting or reloading the daemon is how an operator confirms an empty site at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from imagesync.config.types import DEFAULT_EMPTY_LISTING_PASSES, DEFAULT_FULL_LIST_INTERVAL
from imagesync.engine.pool import SitePool
from imagesync.errors import SiteError
from imagesync.model import ImageRecord, SiteInventory, format_time

log = structlog.get_logger("imagesync.inventory")

#: seconds between full listings of a site that can list changes (deletions by others are
#: noticed then); in between, an idle pass reads only what changed
FULL_LIST_EVERY = DEFAULT_FULL_LIST_INTERVAL
GONE = frozenset({"deleted", "pending_delete", "killed"})


@dataclass
class _Cached:
    records: dict[str, ImageRecord]
    watermark: str
    full_at: float


class Inventory:
    """Lists sites (all of them at once: one slow or dead site never stalls the others)."""

    def __init__(
        self,
        pool: SitePool,
        *,
        full_list_every: float = FULL_LIST_EVERY,
        pass_interval: float = 0.0,
        managed: Callable[[str], bool] | None = None,
        empty_passes: int = DEFAULT_EMPTY_LISTING_PASSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.full_list_every = full_list_every
        #: seconds between the daemon's passes: the full listing happens on the last pass
        #: before ``full_list_every`` runs out, not on the first one after
        self.pass_interval = pass_interval
        #: is a name one some rule manages? (None: every name counts)
        self.managed = managed
        self.empty_passes = max(1, empty_passes)
        self.clock = clock
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()
        self._believed: dict[str, int] = {}  # managed images in a site's last believed listing
        self._empty_streak: dict[str, int] = {}  # suspect empty listings in a row

    def forget(self, site_name: str) -> None:
        """Drop a site's cached listing (imagesync changed it): the next listing is full."""
        self._cache.pop(site_name, None)

    def site(
        self, site_name: str, name: str | None = None, incremental: bool = False
    ) -> SiteInventory:
        """One site's images (only those called ``name`` if given), or why it failed."""
        try:
            site = self.pool.get(site_name)
            t0 = time.monotonic()
            images = self._list(site_name, name, incremental)
            log.debug(
                "inventory.listed",
                site=site_name,
                images=len(images),
                name=name,
                incremental=incremental,
                seconds=round(time.monotonic() - t0, 3),
            )
            if name is None:
                suspect = self._suspect(site_name, images)
                if suspect is not None:
                    self.forget(site_name)  # list it fully next time
                    return SiteInventory(site_name, error=suspect)
            images_in_use = site.capabilities.images_in_use
            in_use = images_in_use() if images_in_use is not None else None
            # after listing: the session has its token, so learning the project is free
            owners = site.capabilities.trusted_owners
            return SiteInventory(
                site_name,
                tuple(images),
                listed_at=datetime.now(UTC),
                in_use=frozenset(in_use) if in_use is not None else None,
                trusted_owners=owners() if owners is not None else None,
            )
        except SiteError as exc:
            log.warning("inventory.failed", site=site_name, error=str(exc))
            self.forget(site_name)
            return SiteInventory(site_name, error=str(exc))

    def _suspect(self, site_name: str, images: Sequence[ImageRecord]) -> str | None:
        """Why a whole-site listing is not believed (a sudden drop to zero images of managed
        names), or None; remembers what a believed listing held."""
        count = sum(1 for r in images if self.managed is None or self.managed(r.name))
        with self._lock:
            before = self._believed.get(site_name, 0)
            if count == 0 and before > 0:
                streak = self._empty_streak.get(site_name, 0) + 1
                if streak < self.empty_passes:
                    self._empty_streak[site_name] = streak
                    log.warning(
                        "inventory.suspect_empty",
                        site=site_name,
                        before=before,
                        empty_listings=streak,
                        believed_after=self.empty_passes,
                    )
                    return (
                        f"suspect listing: {before} images of managed names before, none now "
                        "(credentials for another project?); taken as failed until it lists "
                        f"none {self.empty_passes} times in a row "
                        f"({streak} so far) or the daemon is restarted"
                    )
            self._empty_streak.pop(site_name, None)
            self._believed[site_name] = count
        return None

    def all(
        self,
        sites: Sequence[str] | None = None,
        name: str | None = None,
        *,
        incremental: bool = False,
    ) -> dict[str, SiteInventory]:
        """Every site (or ``sites``) listed concurrently."""
        names = list(sites) if sites is not None else self.pool.names
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            results = pool.map(lambda s: self.site(s, name, incremental), names)
            return {inv.site: inv for inv in results}

    def _list(self, site_name: str, name: str | None, incremental: bool) -> list[ImageRecord]:
        site = self.pool.get(site_name)
        list_changed = site.capabilities.list_changed
        if name is not None or list_changed is None:
            return site.list_images(name)
        now = self.clock()
        cached = self._cache.get(site_name)
        # Full on the last pass before the interval runs out, not the first one after it: the
        # deletions a full listing reveals are then noticed within the interval. (Half a pass
        # of slack: passes start a few ms late or early, which must not make every pass full.)
        due = cached is not None and now - cached.full_at + self.pass_interval / 2 >= (
            self.full_list_every
        )
        if incremental and cached is not None and not due:
            changed, watermark = list_changed(cached.watermark)
            records = dict(cached.records)
            for rec in changed:
                if rec.status in GONE:
                    records.pop(rec.id, None)
                else:
                    records[rec.id] = rec
            self._cache[site_name] = _Cached(records, watermark, cached.full_at)
            return list(records.values())
        # A full listing, then the watermark from which the next pass lists only changes.
        images = site.list_images(None)
        stamps = [r.updated_at or r.created_at for r in images]
        watermark = format_time(max(stamps)) if stamps else ""
        self._cache[site_name] = _Cached({r.id: r for r in images}, watermark, now)
        return images
