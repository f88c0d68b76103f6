"""YAML configuration → typed, validated objects. Every error names the file, the key and the fix.

(Loader and validation: see ``load_config``; this header block holds the typed result.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG_PATH = Path("/etc/imagesync/imagesync.yaml")
CONFIG_ENV = "IMAGESYNC_CONFIG"


@dataclass(frozen=True)
class CloudConfig:
    """One OpenStack cloud (its own Keystone + Glance)."""

    name: str
    #: keystoneauth options, fully resolved (from clouds.yaml entry or inline `auth:`);
    #: e.g. {"auth_url":..., "username":..., "password":..., "project_name":..., ...}
    auth: Mapping[str, Any]
    auth_type: str  # "password", "v3applicationcredential", "v3password", "token", ...
    region_name: str | None = None
    interface: str = "public"
    verify: bool | str = True  # TLS verify, or a CA bundle path
    cloud: str | None = None  # the clouds.yaml entry it came from, if any
    timeout: float = 60.0  # seconds, per HTTP request (not per transfer)
    max_transfers: int = 2  # concurrent transfers touching this cloud


@dataclass(frozen=True)
class StoreConfig:
    """A central store: a directory (local/NFS) or, later, VOSpace."""

    name: str
    type: Literal["directory", "vospace"]
    path: Path | None = None  # directory stores
    url: str | None = None  # vospace: base URL of the service
    max_transfers: int = 2
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRule:
    """Which names must be where, and how to keep them."""

    pattern: str  # exact name or fnmatch glob
    clouds: tuple[str, ...]  # resolved: "all" expanded to every configured cloud, in order
    stores: tuple[str, ...] = ()  # `store: x` or `stores: [x, y]`
    visibility: Literal["private", "shared", "community", "public"] = "private"
    min_copies: int = 0  # keep at least k copies of the newest version across sites
    keep: int | None = None  # retention per site: newest N versions; None = keep all
    retire: Literal["hide", "delete"] = "hide"
    on_mismatch: Literal["report", "replace"] = "report"

    @property
    def sites(self) -> tuple[str, ...]:
        return self.clouds + self.stores


@dataclass(frozen=True)
class Config:
    """The whole effective configuration."""

    path: Path | None  # the file it was loaded from (None when built in code)
    state_dir: Path
    poll_interval: float  # seconds
    clouds: Mapping[str, CloudConfig]
    stores: Mapping[str, StoreConfig]
    images: tuple[ImageRule, ...]
    metrics_listen: str | None = None  # "127.0.0.1:9780"
    max_transfers: int = 4  # overall concurrent transfers
    transfer_retries: int = 3
    check_max_age: float = 600.0  # seconds: `check` trusts recorded answers this young
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(self.clouds) + tuple(self.stores)

    def rule_for(self, name: str) -> ImageRule | None:
        """The first rule whose pattern matches ``name`` (exact names before globs)."""
        from fnmatch import fnmatchcase

        for rule in self.images:
            if rule.pattern == name:
                return rule
        for rule in self.images:
            if fnmatchcase(name, rule.pattern):
                return rule
        return None
