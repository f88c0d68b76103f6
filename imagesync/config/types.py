"""The typed configuration: plain frozen dataclasses, the keys a file may use, durations.

This is the bottom of the config package and of imagesync: the engine, the sites and the
planner read these types, so this module imports nothing but the standard library (no YAML,
no OpenStack client). Reading and checking a file is :mod:`imagesync.config.load`'s job.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG_PATH = Path("/etc/imagesync/imagesync.yaml")
CONFIG_ENV = "IMAGESYNC_CONFIG"
DEFAULT_STATE_DIR = Path("/var/lib/imagesync")
DEFAULT_POLL_INTERVAL = 300.0
#: a site that can list only what changed is listed fully at least this often: deletions by
#: others are noticed then (they are not changes Glance lists)
DEFAULT_FULL_LIST_INTERVAL = 600.0
FULL_LIST_INTERVAL_BOUNDS = (30.0, 86400.0)
#: listings in a row of zero images of managed names, after some, before one is believed
DEFAULT_EMPTY_LISTING_PASSES = 3
EMPTY_LISTING_PASSES_MAX = 100


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
    max_transfers: int = 2  # concurrent uploads to this cloud
    #: use this Glance URL instead of the catalog's (clouds.yaml: image_endpoint_override)
    endpoint_override: str | None = None
    #: project ids whose images count as versions here besides the project imagesync
    #: authenticates as (whose images always count); every other owner's are ignored
    trusted_owners: tuple[str, ...] = ()
    #: let this cloud's Glance fetch an image itself (``web-download``) from a URL the source
    #: hands out, when it offers that import method; false: imagesync always relays the bytes
    server_side: bool = True
    #: the disk formats this cloud accepts, preferred first; () accepts any (as they are).
    #: A version in another format is converted on its way here (imagesync.convert)
    disk_formats: tuple[str, ...] = ()


#: where CADC clients look up a VOSpace resource ID (``ivo://authority/service``): a list of
#: ``resourceID = capabilitiesURL`` lines
CADC_REGISTRY = "https://ws.cadc-ccda.hia-iha.nrc-cnrc.gc.ca/reg/resource-caps"


@dataclass(frozen=True)
class VOSpaceConfig:
    """A VOSpace 2.1 service and the container in it that holds the images.

    The service is found as CADC's clients find it: by its VOSI capabilities URL when given,
    otherwise by looking its resource ID up in a registry (``resourceID = URL`` lines). The
    resource ID defaults to the container's (``vos://cadc.nrc.ca~vault/x`` → ``ivo://cadc.nrc.ca/vault``).
    """

    #: ``vos://authority~service/path`` (``!`` written as ``~``), no trailing slash
    container: str
    capabilities_url: str | None = None
    resource_id: str | None = None
    registry: str = CADC_REGISTRY
    #: a file holding a bearer token; re-read when it changes, so it can be rotated
    token_file: Path | None = None
    #: an X.509 proxy certificate: certificate and key in one PEM (``~/.ssl/cadcproxy.pem``)
    certificate: Path | None = None
    verify: bool | str = True  # TLS verify, or a CA bundle path
    timeout: float = 60.0  # seconds, per HTTP request (not per transfer)

    @property
    def authority_resource_id(self) -> str:
        """The resource ID to look up: the one given, else the container's."""
        if self.resource_id:
            return self.resource_id
        authority = self.container.removeprefix("vos://").split("/", 1)[0]
        return "ivo://" + authority.replace("~", "/", 1)


@dataclass(frozen=True)
class StoreConfig:
    """A central store: a directory (local/NFS) or a VOSpace service."""

    name: str
    type: Literal["directory", "vospace"]
    path: Path | None = None  # directory stores
    max_transfers: int = 2
    vospace: VOSpaceConfig | None = None  # vospace stores
    #: how new images are stored: None (as they are) or "zstd" (one zstd frame each; the
    #: image's size and hashes stay those of its uncompressed bytes)
    compress: Literal["zstd"] | None = None


@dataclass(frozen=True)
class BootTest:
    """``boot_test:`` of a rule: boot a new version on ``cloud`` before it spreads."""

    cloud: str
    flavor: str
    timeout: float = 300.0  # seconds until the server must be ACTIVE


@dataclass(frozen=True)
class ImageRule:
    """Which names must be where, and how to keep them."""

    pattern: str  # exact name or fnmatch glob
    clouds: tuple[str, ...]  # resolved: "all" expanded to every configured cloud, in order
    stores: tuple[str, ...] = ()  # `store: x` or `stores: [x, y]`
    visibility: Literal["private", "shared", "community", "public"] = "private"
    min_copies: int = 0  # at least k copies of the newest version across the rule's sites
    keep: int | None = None  # retention per site: newest N versions; None = keep all
    retire: Literal["hide", "delete"] = "hide"
    on_mismatch: Literal["report", "replace"] = "report"
    boot_test: BootTest | None = None

    @property
    def sites(self) -> tuple[str, ...]:
        return self.clouds + self.stores


#: ``conversion: scratch_max_size`` when the file does not set it
DEFAULT_SCRATCH_MAX_SIZE = 20 * 1024**3


@dataclass(frozen=True)
class ConversionConfig:
    """``conversion:``: where disk formats are converted (qcow2 needs random access, so an
    image is downloaded, converted and uploaded through files) and how much room that may
    take at once (the original plus its converted copy, for every conversion running)."""

    #: None: ``<state_dir>/scratch``
    scratch_dir: Path | None = None
    scratch_max_size: int = DEFAULT_SCRATCH_MAX_SIZE  # bytes

    def directory(self, state_dir: Path) -> Path:
        return self.scratch_dir if self.scratch_dir is not None else state_dir / "scratch"


#: the default TTL of a member's locks and membership in the coordination service
DEFAULT_LEASE_TIMEOUT = 30.0
LEASE_TIMEOUT_RANGE = (2.0, 3600.0)


@dataclass(frozen=True)
class CoordinationConfig:
    """Several daemons sharing the work through tooz (``coordination:``; absent = one host,
    local locks). ``url`` may hold credentials: show ``display_url``, never ``url``."""

    url: str  # the tooz backend URL, e.g. etcd3+http://etcd.example.org:2379
    #: TTL of the upload locks and of membership: a dead member's names and locks are free
    #: this long after its last heartbeat (sent every half of it)
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT
    #: this daemon's stable name in the group; None: host name + instance id of state_dir
    member_id: str | None = None
    group: str = "imagesync"

    @property
    def display_url(self) -> str:
        """The URL without user, password or secret query values, for logs and status."""
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        query = urlencode(
            [
                (k, "********" if any(w in k.lower() for w in ("pass", "secret", "token")) else v)
                for k, v in parse_qsl(parts.query)
            ]
        )
        return urlunsplit((parts.scheme, host, parts.path, query, ""))


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
    #: a metrics_listen beyond loopback (0.0.0.0, a LAN address) is refused unless this is set
    metrics_listen_public: bool = False
    max_transfers: int = 4  # overall concurrent transfers
    transfer_retries: int = 3
    check_max_age: float = 600.0  # seconds: `check` trusts recorded answers this young
    full_list_interval: float = DEFAULT_FULL_LIST_INTERVAL  # seconds between full listings
    empty_listing_passes: int = DEFAULT_EMPTY_LISTING_PASSES  # see engine.inventory
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    conversion: ConversionConfig = ConversionConfig()
    #: several daemons sharing the work (``imagesync.coordination``); None: this host alone
    coordination: CoordinationConfig | None = None

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(self.clouds) + tuple(self.stores)

    def rule_for(self, name: str) -> ImageRule | None:
        """The first rule whose pattern matches ``name`` (exact names before globs)."""
        for rule in self.images:
            if rule.pattern == name:
                return rule
        for rule in self.images:
            if fnmatchcase(name, rule.pattern):
                return rule
        return None


# --------------------------------------------------------------------------- schema
# The keys and values a file may use. Kept beside the types they fill so that a new field and
# its key are added together; the example (imagesync/data/imagesync.yaml.example) documents
# every one (a test checks).

TOP_KEYS = (
    "state_dir",
    "poll_interval",
    "clouds_yaml",
    "clouds",
    "stores",
    "images",
    "metrics_listen",
    "metrics_listen_public",
    "max_transfers",
    "transfer_retries",
    "check_max_age",
    "full_list_interval",
    "empty_listing_passes",
    "log_format",
    "log_level",
    "conversion",
    "coordination",
)
CONVERSION_KEYS = ("scratch_dir", "scratch_max_size")
COORDINATION_KEYS = ("url", "lease_timeout", "member_id", "group")
CLOUD_COMMON_KEYS = (
    "region_name",
    "interface",
    "verify",
    "timeout",
    "max_transfers",
    "endpoint_override",
    "trusted_owners",
    "server_side",
    "disk_formats",
)
CLOUD_KEYS = ("cloud", "auth", "auth_type", *CLOUD_COMMON_KEYS)
STORE_TYPES = ("directory", "vospace")
#: what a store's ``compress:`` may be (besides ``none``)
COMPRESSIONS = ("zstd",)
DIRECTORY_KEYS = ("type", "path", "max_transfers", "compress")
#: vospace: ``container`` is the node holding the images (``vos://authority~service/path``);
#: the service is ``url`` (its capabilities URL, or its base URL) or ``resource_id`` looked up
#: in ``registry``; ``certificate`` a PEM proxy certificate, ``token_file`` a bearer token's file
VOSPACE_KEYS = (
    "type",
    "url",
    "resource_id",
    "registry",
    "container",
    "certificate",
    "token_file",
    "verify",
    "timeout",
    "max_transfers",
    "compress",
)
RULE_KEYS = (
    "name",
    "clouds",
    "store",
    "stores",
    "visibility",
    "min_copies",
    "keep",
    "retire",
    "on_mismatch",
    "boot_test",
)
BOOT_TEST_KEYS = ("cloud", "flavor", "timeout")
VISIBILITIES = ("private", "shared", "community", "public")
RETIRE = ("hide", "delete")
ON_MISMATCH = ("report", "replace")
INTERFACES = ("public", "internal", "admin")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# The allowed range (low, high, inclusive) of each numeric setting; the example configuration
# says why each bound is where it is. A value outside is a mistake (0.001 for a poll interval,
# 1000 for retries) that would hammer the clouds or never give up, so the file is refused.
POLL_INTERVAL_RANGE = (1.0, 86400.0)  # 1s (tests, a lab) to 1d
CHECK_MAX_AGE_RANGE = (0.0, 86400.0)  # 0 (always ask) to 1d
TIMEOUT_RANGE = (1.0, 3600.0)  # per HTTP request: 1s to 1h
MAX_TRANSFERS_RANGE = (1, 64)  # overall and per site
TRANSFER_RETRIES_RANGE = (0, 20)


def listens_on_loopback(listen: str) -> bool:
    """Whether ``host:port`` (``metrics_listen``) listens on this machine only.

    Host names other than ``localhost`` count as not loopback: what they resolve to can change.
    """
    host = listen.strip().rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
DURATION_HINT = "write a duration like 30s, 5m, 1h, 1h30m or 2d (a bare number is seconds)"


def describe(value: object) -> str:
    """What a YAML value is, for messages: ``a string ('x')``, ``a list``, ``empty``…"""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"true/false ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _parse_duration_text(value: str) -> float:
    text = value.strip().lower()
    if re.fullmatch(r"[+-]?\d+(?:\.\d+)?", text):
        return float(text)
    negative = text.startswith("-")
    body = text.lstrip("+-").replace(" ", "")
    parts = _DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"{value!r} is not a duration")
    units = [u for _, u in parts]
    if units != sorted(set(units), key="dhms".index):
        raise ValueError(f"{value!r}: give each unit once, largest first (like 1h30m)")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    return -seconds if negative else seconds


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``2.5``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``.

    Raises ValueError saying what is wrong (not a duration, negative, not finite).
    """
    if isinstance(value, bool):
        raise ValueError("is true/false, not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        raise ValueError(f"is {describe(value)}, not a duration")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest string ``parse_duration`` reads back: 300 → ``5m``, 5400 → ``1h30m``."""
    if seconds != int(seconds) or seconds == 0:
        return f"{seconds:g}s"
    rest = int(seconds)
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out
