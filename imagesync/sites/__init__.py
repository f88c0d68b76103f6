"""Sites: the places images live (Glance clouds, directory stores, VOSpace), behind one protocol.

``open_site`` is the one place that knows which class serves which kind of site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagesync.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from imagesync.config.types import Config
    from imagesync.sites.base import Site


def open_site(config: Config, name: str) -> Site:
    """Build the Site for the cloud or store called ``name`` in ``config``."""
    if name in config.clouds:
        from imagesync.sites.glance import GlanceSite

        return GlanceSite(config.clouds[name])
    if name in config.stores:
        store = config.stores[name]
        if store.type == "directory":
            from imagesync.sites.directory import DirectorySite

            assert store.path is not None
            return DirectorySite(name, store.path)
        raise ConfigError(f"store type {store.type!r} is not supported yet",
                          file=str(config.path), key=f"stores.{name}.type")
    known = ", ".join(config.site_names) or "none"
    raise UsageError(f"no cloud or store called {name!r} in {config.path} (known: {known})")
