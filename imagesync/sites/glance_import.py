"""Glance's ``web-download`` import: the cloud fetches an image from a URL itself.

Glance advertises its import methods at ``GET /v2/info/import``; it is asked once, on first
use (capabilities are filled without I/O), and the answer kept for the site's life. A cloud
configured with ``server_side: false`` is never asked. A probe that failed transiently is
asked again next time.

The import (``POST /v2/images/{id}/import`` with ``{"method": {"name": "web-download", "uri":
URL}}``, 202) needs a queued image with its formats set: the placeholder ``create_for_import``
makes. Glance then goes ``queued → importing → active``; a failure puts the image back to
``queued`` with ``os_glance_failed_import`` set (the cause only in Glance's log). ``active``
can show a moment before the import's lock (``os_glance_import_task``) is gone: the lock is
waited for, briefly, so that the publish that follows does not race it. Glance checks no hash
of what it fetched (and a source that closes early gives an active, truncated image): the
caller verifies the record returned (engine/serverside.py). Errors name the URL only as
``SharedURL.shown``: the real one carries a grant.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from imagesync.config.types import CloudConfig
from imagesync.errors import Cancelled, SiteError, TransientError
from imagesync.model import ImageRecord
from imagesync.sites.base import SharedURL

if TYPE_CHECKING:
    from keystoneauth1 import adapter as ks_adapter

log = structlog.get_logger("imagesync.glance")
T = TypeVar("T")

METHOD = "web-download"
#: the slowest fetch an import is given time for (bytes per second), on top of the timeout
MIN_RATE = 5 * 1024 * 1024
#: how long an active image's import lock is waited for before publishing anyway
LOCK_GRACE = 5.0


class ImportSite(Protocol):
    """What a web-download needs of its site; ``GlanceSite`` is one (``_call`` and ``_record``
    are its own helpers: this module is a part of it, split off). A protocol, so that this
    module, which ``glance`` imports, does not import ``glance`` back."""

    name: str
    cfg: CloudConfig
    adapter: ks_adapter.Adapter

    def _call(self, what: str, fn: Callable[[], T]) -> T: ...
    def _record(self, raw: Mapping[str, Any]) -> ImageRecord: ...


class WebDownload:
    """One cloud's web-download: the lazy probe and the import, with an injectable clock."""

    def __init__(
        self,
        site: ImportSite,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.site = site
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._offered: bool | None = None

    def available(self) -> bool:
        """Whether the cloud offers web-download (asked once; ``server_side: false``: no)."""
        if not self.site.cfg.server_side:
            return False
        with self._lock:
            if self._offered is None:
                from imagesync.sites.openstack import classify

                try:
                    info = self.site.adapter.get("/v2/info/import").json()
                except Exception as exc:
                    err = classify(exc, self.site.name, "read the import methods")
                    log.info("import.methods_unknown", site=self.site.name, error=str(err))
                    if isinstance(err, TransientError):
                        return False  # ask again next time
                    self._offered = False
                    return False
                self._offered = METHOD in _methods(info)
                log.info("import.methods", site=self.site.name, web_download=self._offered)
            return self._offered

    def run(self, image_id: str, url: SharedURL, should_stop: Callable[[], bool]) -> ImageRecord:
        """Import ``url`` into the queued placeholder ``image_id`` and wait for the outcome."""
        from imagesync.sites.openstack import classify

        site = self.site
        what = f"web-download {url.shown} into {image_id}"
        body = {"method": {"name": METHOD, "uri": url.url}}
        try:
            site.adapter.post(f"/v2/images/{image_id}/import", json=body)
        except Exception as exc:
            err = classify(exc, site.name, what)
            # Glance may echo the URL in its answer: scrubbed; not chained (the library's
            # exception holds the URL too)
            message = url.scrub(str(err).removeprefix(f"{site.name}: "))
            raise type(err)(message, site=site.name) from None
        deadline = self.clock() + site.cfg.timeout + url.size / MIN_RATE
        active_since: float | None = None
        delay = 0.1
        while True:
            if should_stop():
                raise Cancelled(f"{what}: cancelled")
            raw = self._raw(image_id, what)
            status = str(raw.get("status") or "unknown")
            if raw.get("os_glance_failed_import"):
                raise SiteError(
                    f"{what}: the import failed (Glance's log says why)", site=site.name
                )
            if status == "active":
                now = self.clock()
                active_since = now if active_since is None else active_since
                if not raw.get("os_glance_import_task") or now - active_since > LOCK_GRACE:
                    return site._record(raw)
            elif status in ("killed", "deleted", "pending_delete", "deactivated"):
                raise SiteError(f"{what}: the image became {status}", site=site.name)
            if self.clock() > deadline:
                raise TransientError(f"{what}: still {status}: timed out", site=site.name)
            self.sleep(delay)
            # a GET every half second at most: an import ending just after a poll is seen soon
            delay = min(delay * 1.5, 0.5)

    def _raw(self, image_id: str, what: str) -> dict[str, Any]:
        site = self.site
        raw = site._call(what, lambda: site.adapter.get(f"/v2/images/{image_id}").json())
        if not isinstance(raw, dict):
            raise SiteError(f"{what}: Glance sent an image that is not an object", site=site.name)
        return raw


def _methods(info: object) -> list[str]:
    """The import methods in a ``/v2/info/import`` answer (``{"import-methods": {"value":
    [...]}}``); [] for anything else."""
    if not isinstance(info, dict):
        return []
    entry = info.get("import-methods")
    value = entry.get("value") if isinstance(entry, dict) else None
    return [str(m) for m in value] if isinstance(value, list) else []
