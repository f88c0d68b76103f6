"""The site pool: every site opened once, lazily, and how many transfers each may carry.

Transfer threads open sites too, so each site is opened once, under a lock of its own: two
sites open side by side (the inventory lists every site concurrently, and opening a Glance
cloud imports its client libraries, ~0.2 to 0.9 s, during which a VOSpace store can already
fetch its capabilities and list). A site is built by ``sites.open_site`` from the
configuration, or handed in already open (the demo, tests).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from imagesync.config.types import Config
from imagesync.sites import open_site
from imagesync.sites.base import Site


class SitePool:
    """The sites of one process, opened on first use and closed together."""

    def __init__(self, config: Config, opened: Mapping[str, Site] | None = None) -> None:
        self.config = config
        self._sites: dict[str, Site] = dict(opened or {})
        self._lock = threading.Lock()  # guards the two dicts
        self._opening: dict[str, threading.Lock] = {}  # one per site: opened once

    @property
    def names(self) -> list[str]:
        """The configured sites in config order, then sites handed in that it does not name."""
        configured = list(self.config.site_names)
        return configured + [s for s in self._sites if s not in configured]

    def get(self, name: str) -> Site:
        with self._lock:
            site = self._sites.get(name)
            if site is not None:
                return site
            opening = self._opening.setdefault(name, threading.Lock())
        with opening:  # another thread opening this site: wait for it, then take its site
            with self._lock:
                site = self._sites.get(name)
            if site is None:
                site = open_site(self.config, name)
                with self._lock:
                    self._sites[name] = site
            return site

    def limit(self, name: str) -> int:
        """How many transfers may touch site ``name`` at once (its own ``max_transfers``;
        a site the configuration does not name shares the overall limit)."""
        if name in self.config.clouds:
            return max(1, self.config.clouds[name].max_transfers)
        if name in self.config.stores:
            return max(1, self.config.stores[name].max_transfers)
        return max(1, self.config.max_transfers)

    def close(self) -> None:
        with self._lock:
            for site in self._sites.values():
                site.close()
