"""Recovery: removing what a crashed run left half-made. Only ever called by name.

An upload is half-made while it is marked ``imagesync.state=uploading`` (and leased in the
state database). One whose (name, site) lock nobody holds is a leftover: no live imagesync is
writing it (the kernel frees a dead process's locks). One whose lock is held is a copy in
flight and stays. Reads (``inventory``) never delete; ``push``, ``sync``, ``check --ensure``
and the daemon call ``recover`` before they plan, and the executor calls ``clean_locked``
for the one (name, site) whose lock it has just taken.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import structlog

from imagesync.engine.inventory import Inventory
from imagesync.engine.pool import SitePool
from imagesync.errors import ImageSyncError, LockBusy, SiteError
from imagesync.model import ImageRecord, SiteInventory
from imagesync.state import State

log = structlog.get_logger("imagesync.recovery")


class Recovery:
    """Finds and removes crash leftovers and orphaned leases."""

    def __init__(self, pool: SitePool, state: State, inventory: Inventory) -> None:
        self.pool = pool
        self.state = state
        self.inventory = inventory

    def recover(self, inventories: Mapping[str, SiteInventory]) -> dict[str, SiteInventory]:
        """Remove uploads a crashed run left half-made; return the inventories without them.

        Leases whose lock nobody holds are leftovers too: the upload they name is removed
        even when the listing did not show it as one.
        """
        removed = self._recover_leases(inventories)
        out: dict[str, SiteInventory] = {}
        for site_name, inv in inventories.items():
            gone = removed.get(site_name, set())
            if not inv.ok or not any(r.in_progress or r.id in gone for r in inv.images):
                out[site_name] = inv
                continue
            # another project's image marked "uploading" is not imagesync's leftover
            kept = [
                rec
                for rec in inv.images
                if rec.id not in gone
                and not (
                    rec.in_progress
                    and inv.trusts(rec)
                    and self._remove(site_name, rec.name, rec.id, rec.status)
                )
            ]
            out[site_name] = dataclasses.replace(inv, images=tuple(kept))
        return out

    def clean_locked(
        self, site_name: str, name: str, records: Sequence[ImageRecord]
    ) -> list[ImageRecord]:
        """The caller holds the (name, site) lock: every upload of ``name`` still marked as
        uploading there is a leftover. Remove them; return the other records."""
        site = self.pool.get(site_name)
        kept = []
        for rec in records:
            if not rec.in_progress:
                kept.append(rec)
                continue
            log.warning("cleanup.leftover", site=site_name, image_id=rec.id, image=name)
            site.delete(rec.id)
            self.inventory.forget(site_name)
        return kept

    def remove_own_uploads(self) -> int:
        """Delete every upload this process has leased (last resort at shutdown, when a
        transfer thread did not stop in time). Returns how many were removed."""
        count = 0
        for lease in self.state.leases(pid=os.getpid()):
            try:
                self.pool.get(lease.site).delete(lease.image_id)
            except ImageSyncError as exc:
                log.warning(
                    "cleanup.failed", site=lease.site, image_id=lease.image_id, error=str(exc)
                )
                continue
            self.state.drop_lease(lease.site, lease.image_id)
            self.inventory.forget(lease.site)
            log.warning(
                "cleanup.own_upload", site=lease.site, image=lease.name, image_id=lease.image_id
            )
            count += 1
        return count

    def _recover_leases(self, inventories: Mapping[str, SiteInventory]) -> dict[str, set[str]]:
        removed: dict[str, set[str]] = {}
        for lease in self.state.leases():
            inv = inventories.get(lease.site)
            if inv is None or not inv.ok:
                continue  # cannot reach it now: the lease stays for a later pass
            if self._remove(lease.site, lease.name, lease.image_id, "leased"):
                self.state.drop_lease(lease.site, lease.image_id)
                removed.setdefault(lease.site, set()).add(lease.image_id)
        return removed

    def _remove(self, site_name: str, name: str, image_id: str, status: str) -> bool:
        try:
            with self.state.lock(name, site_name):
                self.pool.get(site_name).delete(image_id)
            self.inventory.forget(site_name)
        except LockBusy:
            return False
        except SiteError as exc:
            log.warning("cleanup.failed", site=site_name, image_id=image_id, error=str(exc))
            return False
        log.warning(
            "cleanup.leftover", site=site_name, image=name, image_id=image_id, status=status
        )
        return True
