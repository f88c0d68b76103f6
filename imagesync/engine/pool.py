"""The site pool: every site opened once, lazily, and how many transfers each may carry.

Transfer threads open sites too, so opening is serialised; a site is built by
``sites.open_site`` from the configuration, or handed in already open (the demo, tests).
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
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """The configured sites in config order, then sites handed in that it does not name."""
        configured = list(self.config.site_names)
        return configured + [s for s in self._sites if s not in configured]

    def get(self, name: str) -> Site:
        with self._lock:
            if name not in self._sites:
                self._sites[name] = open_site(self.config, name)
            return self._sites[name]

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
