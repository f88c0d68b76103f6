"""Recovery: removing what a crashed run left half-made. Only ever called by name.

An upload is half-made while it is marked ``imagesync.state=uploading`` (and leased in the
state database). One whose (name, site) lock nobody holds is a leftover: no live imagesync is
writing it (the kernel frees a dead process's locks). One whose lock is held is a copy in
flight and stays. Reads (``inventory``) never delete; ``push``, ``sync``, ``check --ensure``
and the daemon call ``recover`` before they plan, and the executor calls ``clean_locked``
for the one (name, site) whose lock it has just taken.

What recovery knows from a listing or a lease is old by the time it holds the lock: the
upload may have been published since (a ``push`` racing the daemon; a ``kill -9`` between
``publish()`` and dropping the lease). So every removal re-reads the image *under the lock*
and deletes only what is still marked as uploading; a published image is kept and its lease
dropped, one already gone just loses its lease.

The lock only covers this instance (one ``state_dir``). Another instance's upload is told by
its marker (``engine.marker``): it is removed only once its lease has expired.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from imagesync.coordination import Coordinator, locked
from imagesync.engine.inventory import Inventory
from imagesync.engine.marker import UploadMarker
from imagesync.engine.pool import SitePool
from imagesync.errors import ImageSyncError, LockBusy, NotFound, SiteError
from imagesync.model import ImageRecord, SiteInventory
from imagesync.state import State

log = structlog.get_logger("imagesync.recovery")


class Verdict(enum.Enum):
    """What re-reading a supposed leftover found (and did)."""

    REMOVED = "removed"  # still an upload nobody may be writing: deleted
    GONE = "gone"  # not there any more
    PUBLISHED = "published"  # published since it was listed or leased: kept
    FOREIGN = "foreign"  # another instance's upload whose lease has not expired: kept

    @property
    def lease_done(self) -> bool:
        """Is a lease naming this image finished with? Ours only while it may still be ours."""
        return self is not Verdict.FOREIGN


@dataclasses.dataclass(eq=False)  # eq=False: compared by identity, hashable
class Recovery:
    """Finds and removes crash leftovers and orphaned leases."""

    pool: SitePool
    state: State
    inventory: Inventory
    #: compared with other instances' lease expiries (wall clock)
    clock: Callable[[], float] = time.time
    #: several daemons: another member's upload is kept while its lease (in the service)
    #: lives, and nothing is deleted unless the lock is still ours
    coordinator: Coordinator | None = dataclasses.field(default=None, init=False)

    def recover(self, inventories: Mapping[str, SiteInventory]) -> dict[str, SiteInventory]:
        """Remove uploads a crashed run left half-made; return the inventories without them.

        Leases whose lock nobody holds are leftovers too: the upload they name is removed
        (if it is still one) even when the listing did not show it as one.
        """
        settled = self._recover_leases(inventories)
        out: dict[str, SiteInventory] = {}
        for site_name, inv in inventories.items():
            seen = settled.get(site_name, {})
            if not inv.ok or not any(r.in_progress or r.id in seen for r in inv.images):
                out[site_name] = inv
                continue
            kept: list[ImageRecord] = []
            for rec in inv.images:
                if rec.id in seen:
                    fresh: ImageRecord | None = seen[rec.id]
                elif rec.in_progress and inv.trusts(rec):
                    # (another project's image marked "uploading" is not imagesync's leftover)
                    fresh = self._settle_unlocked(site_name, rec.name, rec.id, rec)
                else:
                    fresh = rec
                if fresh is not None:
                    kept.append(fresh)
            out[site_name] = dataclasses.replace(inv, images=tuple(kept))
        return out

    def clean_locked(
        self, site_name: str, name: str, records: Sequence[ImageRecord]
    ) -> list[ImageRecord]:
        """The caller holds the (name, site) lock: every upload of ``name`` still marked as
        uploading there (and not another instance's live one) is a leftover. Remove them;
        return the other records, as they are now."""
        kept = []
        for rec in records:
            if not rec.in_progress:
                kept.append(rec)
                continue
            verdict, fresh = self.settle(site_name, name, rec.id)
            if fresh is not None and verdict is not Verdict.REMOVED:
                kept.append(fresh)
        return kept

    def settle(
        self, site_name: str, name: str, image_id: str
    ) -> tuple[Verdict, ImageRecord | None]:
        """The caller holds the (name, site) lock: re-read ``image_id`` and delete it only if
        it is still an upload that no live imagesync may be writing. Returns what was found
        (and the record as it is now, when it is still there). Raises SiteError."""
        site = self.pool.get(site_name)
        try:
            rec = site.get_image(image_id)
        except NotFound:
            # no record, but an upload killed before its record was written may have left
            # data behind (a directory store's partial file): deleting a missing id is no
            # error on any site, and removes such leftovers
            site.delete(image_id)
            return Verdict.GONE, None
        if not rec.in_progress:
            log.info("cleanup.kept_published", site=site_name, image=name, image_id=image_id)
            return Verdict.PUBLISHED, rec
        marker = UploadMarker.of(rec)
        if marker is not None and marker.instance != self.state.instance_id:
            foreign_live = self._foreign_live(site_name, image_id, marker)
        else:
            foreign_live = False
        coord = self.coordinator
        if not foreign_live and coord is not None and not coord.holds(name, site_name):
            foreign_live = True  # no longer sure the lock is ours: delete nothing
        if foreign_live:
            log.info(
                "cleanup.kept_foreign",
                site=site_name,
                image=name,
                image_id=image_id,
                host=marker.host if marker else None,
                instance=marker.instance if marker else None,
                expires=marker.expires if marker else None,
            )
            return Verdict.FOREIGN, rec
        site.delete(image_id)
        self.inventory.forget(site_name)
        log.warning(
            "cleanup.leftover",
            site=site_name,
            image=name,
            image_id=image_id,
            owner=marker.instance if marker is not None else None,
        )
        return Verdict.REMOVED, rec

    def _foreign_live(self, site_name: str, image_id: str, marker: UploadMarker) -> bool:
        """Must another instance's upload be left alone? A member of this group's: while its
        lease in the service lives (it dies with the owner's lock), or when that cannot be told
        now; any other's: while its marker's long lease (engine.marker) has not expired."""
        coord = self.coordinator
        if coord is not None and coord.knows_instance(marker.instance):
            alive = coord.upload_alive(site_name, image_id)
            return alive is not False
        # not one of this group's members: its upload is not leased in our service
        return marker.live_for_others(self.clock())

    def remove_own_uploads(self) -> int:
        """Delete every upload this process has leased (last resort at shutdown, when a
        transfer thread did not stop in time). Returns how many were removed.

        The stuck thread holds the locks, so they cannot be taken here; each upload is still
        re-read first, and one published meanwhile is kept."""
        count = 0
        for lease in self.state.leases(pid=os.getpid()):
            site = self.pool.get(lease.site)
            try:
                rec = site.get_image(lease.image_id)
                if rec.in_progress:
                    site.delete(lease.image_id)
            except NotFound:
                rec = None
                with contextlib.suppress(ImageSyncError):
                    site.delete(lease.image_id)  # leftovers of an upload with no record yet
            except ImageSyncError as exc:
                log.warning(
                    "cleanup.failed", site=lease.site, image_id=lease.image_id, error=str(exc)
                )
                continue
            self.state.drop_lease(lease.site, lease.image_id)
            self.inventory.forget(lease.site)
            if rec is not None and rec.in_progress:
                log.warning(
                    "cleanup.own_upload", site=lease.site, image=lease.name, image_id=lease.image_id
                )
                count += 1
        return count

    def _recover_leases(
        self, inventories: Mapping[str, SiteInventory]
    ) -> dict[str, dict[str, ImageRecord | None]]:
        """Settle every lease whose site was listed; per site, the leased ids settled and
        their records now (None: removed or gone)."""
        settled: dict[str, dict[str, ImageRecord | None]] = {}
        for lease in self.state.leases():
            inv = inventories.get(lease.site)
            if inv is None or not inv.ok:
                continue  # cannot reach it now: the lease stays for a later pass
            result = self._settle_locked(lease.site, lease.name, lease.image_id)
            if result is None:
                continue  # busy or failed: the lease stays for a later pass
            verdict, fresh = result
            if verdict.lease_done:
                self.state.drop_lease(lease.site, lease.image_id)
            keep = fresh if verdict in (Verdict.PUBLISHED, Verdict.FOREIGN) else None
            settled.setdefault(lease.site, {})[lease.image_id] = keep
        return settled

    def _settle_unlocked(
        self, site_name: str, name: str, image_id: str, listed: ImageRecord
    ) -> ImageRecord | None:
        """Settle a listed upload under its lock; the record to keep in the inventory (the
        listed one when its lock is held or the site failed), None when it was removed."""
        result = self._settle_locked(site_name, name, image_id)
        if result is None:
            return listed
        verdict, fresh = result
        return fresh if verdict in (Verdict.PUBLISHED, Verdict.FOREIGN) else None

    def _settle_locked(
        self, site_name: str, name: str, image_id: str
    ) -> tuple[Verdict, ImageRecord | None] | None:
        """Take the lock and settle; None when the lock is held or the site failed."""
        try:
            with locked(self.state, self.coordinator, name, site_name):
                return self.settle(site_name, name, image_id)
        except LockBusy:
            return None
        except SiteError as exc:
            log.warning("cleanup.failed", site=site_name, image_id=image_id, error=str(exc))
            return None
