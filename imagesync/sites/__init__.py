"""Sites: the places images live (Glance clouds, directory stores), behind one protocol.

:data:`KINDS` is the registry of the kinds of site imagesync can build, and :func:`open_site`
builds from it: the one place that knows which class serves which kind. A cloud is a Glance
site; a store's ``type:`` names its kind (``directory``, ``vospace``), and :func:`store_kinds`
is the set the configuration may accept (a kind that is not built here is not in it). The
in-memory site (``sites.memory``) is for tests and is injected, never configured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TypeVar

from imagesync.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from imagesync.config.types import Config
    from imagesync.sites.base import Site

T = TypeVar("T")


@dataclass(frozen=True)
class Kind:
    """One kind of site: where the configuration declares it, and how to build one."""

    name: str
    #: "clouds": every entry of ``clouds:``; "stores": a ``stores:`` entry of ``type: <name>``
    section: Literal["clouds", "stores"]
    #: build the site called ``name`` in the config (imports its module on first use, so a
    #: command that never touches a cloud never imports the OpenStack clients)
    build: Callable[[Config, str], Site]


def _glance(config: Config, name: str) -> Site:
    from imagesync.sites.glance import GlanceSite

    return GlanceSite(config.clouds[name])


def _vospace(config: Config, name: str) -> Site:
    from imagesync.sites.vospace import VOSpaceSite

    store = config.stores[name]
    return VOSpaceSite(
        name, _required(config, name, "container", store.vospace), compress=store.compress
    )


def _directory(config: Config, name: str) -> Site:
    from imagesync.sites.directory import DirectorySite

    store = config.stores[name]
    return DirectorySite(name, _required(config, name, "path", store.path), compress=store.compress)


def _required(config: Config, store: str, key: str, value: T | None) -> T:
    """A store's setting its kind cannot do without: the config loader requires it, but a
    hand-built Config may lack it."""
    if value is None:
        kind = config.stores[store].type
        raise ConfigError(
            f"a {kind} store needs a {key}", file=_file(config), key=f"stores.{store}.{key}"
        )
    return value


#: every kind of site imagesync builds, by name
KINDS: Mapping[str, Kind] = MappingProxyType(
    {
        "glance": Kind("glance", "clouds", _glance),
        "directory": Kind("directory", "stores", _directory),
        "vospace": Kind("vospace", "stores", _vospace),
    }
)


def store_kinds() -> frozenset[str]:
    """The store ``type:`` values imagesync can build (the ones the config should accept)."""
    return frozenset(k.name for k in KINDS.values() if k.section == "stores")


def _file(config: Config) -> str | None:
    return str(config.path) if config.path is not None else None


def open_site(config: Config, name: str) -> Site:
    """Build the Site for the cloud or store called ``name`` in ``config``."""
    if name in config.clouds:
        return KINDS["glance"].build(config, name)
    if name in config.stores:
        kind = KINDS.get(config.stores[name].type)
        if kind is None or kind.section != "stores":
            known = ", ".join(sorted(store_kinds()))
            raise ConfigError(
                f"store type {config.stores[name].type!r} is not supported (supported: {known})",
                file=_file(config),
                key=f"stores.{name}.type",
            )
        return kind.build(config, name)
    known = ", ".join(config.site_names) or "none"
    raise UsageError(f"no cloud or store called {name!r} in {config.path} (known: {known})")
