"""imagesync's configuration: typed values, and the reader that checks a YAML file into them.

- :mod:`imagesync.config.types`: the frozen dataclasses (:class:`Config`, :class:`CloudConfig`,
  :class:`StoreConfig`, :class:`ImageRule`), the accepted keys, durations. Standard library
  only: the engine, the planner and the sites depend on it.
- :mod:`imagesync.config.document`: the line-tracking YAML reader whose checks fail as
  ``FILE:LINE: KEY: what is wrong: the fix``.
- :mod:`imagesync.config.rules`: the ``images:`` rules, checked against the configured sites.
- :mod:`imagesync.config.load`: ``load_config`` (clouds, stores, clouds.yaml through
  :mod:`imagesync.sites.openstack_auth`) and ``resolve_config_path``.
- :mod:`imagesync.config.render`: ``render_config`` (``imagesync config show``).

This package re-exports the types only. Importing any submodule runs this file first, so it
must not import the reader, the loader or the renderer: that would pull YAML (and, through the
loader, the sites layer) under every module that only wants a dataclass. Import
``load_config`` from :mod:`imagesync.config.load`, ``render_config`` from
:mod:`imagesync.config.render`.
"""

from imagesync.config.types import CloudConfig, Config, ImageRule, StoreConfig

__all__ = ["CloudConfig", "Config", "ImageRule", "StoreConfig"]
