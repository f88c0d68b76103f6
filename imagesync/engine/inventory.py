"""The inventory: what every site holds, listed concurrently, with an incremental cache.

Reading never changes a site: crash leftovers show up in a listing as ``in_progress``
records and are removed only where ``recovery`` is called by name.

A site that can list only what changed since a watermark is listed fully once, then
incrementally on the daemon's passes, and fully again every ``full_list_every`` seconds (the
only way to notice images deleted by someone else) or after imagesync changed it (``forget``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from imagesync.engine.pool import SitePool
from imagesync.errors import SiteError
from imagesync.model import ImageRecord, SiteInventory, format_time

log = structlog.get_logger("imagesync.inventory")

#: seconds between full listings of a site that can list changes (deletions by others are
#: noticed then); in between, an idle pass reads only what changed
FULL_LIST_EVERY = 600.0
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.full_list_every = full_list_every
        self.clock = clock
        self._cache: dict[str, _Cached] = {}

    def forget(self, site_name: str) -> None:
        """Drop a site's cached listing (imagesync changed it): the next listing is full."""
        self._cache.pop(site_name, None)

    def site(
        self, site_name: str, name: str | None = None, incremental: bool = False
    ) -> SiteInventory:
        """One site's images (only those called ``name`` if given), or why it failed."""
        try:
            site = self.pool.get(site_name)
            images = self._list(site_name, name, incremental)
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
        if incremental and cached is not None and now - cached.full_at < self.full_list_every:
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
