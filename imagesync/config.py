"""YAML configuration → typed, validated objects. Every error names the file, the key and the fix.

``load_config`` reads the file, checks everything (unknown keys with a suggestion, types,
durations, references between rules and sites, credentials) and returns a frozen :class:`Config`,
or raises one :class:`~imagesync.errors.ConfigError` whose message reads like
``/etc/imagesync/imagesync.yaml:31: images[2].clouds[1]: no cloud named 'uvc': did you mean
'uvic'? …``. ``cloud: ENTRY`` sites are resolved through openstacksdk's clouds.yaml loader, so the
usual search path, ``$OS_CLIENT_CONFIG_FILE`` and ``secure.yaml`` work as for the ``openstack``
command. Every secret read is registered with :mod:`imagesync.logs` so that logs mask it.

``render_config`` prints the effective configuration with secrets masked;
``imagesync.sites.probe.check_connections`` authenticates to every cloud and probes every
directory store (``imagesync config check --connect``). The annotated example of every key
is ``etc/imagesync.yaml.example``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, cast
from urllib.parse import urlparse

import yaml

from imagesync.errors import ConfigError
from imagesync.secrets import is_secret_key, mask, redact, register_secret

DEFAULT_CONFIG_PATH = Path("/etc/imagesync/imagesync.yaml")
CONFIG_ENV = "IMAGESYNC_CONFIG"
DEFAULT_STATE_DIR = Path("/var/lib/imagesync")
DEFAULT_POLL_INTERVAL = 300.0


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


# --------------------------------------------------------------------------- schema

TOP_KEYS = ("state_dir", "poll_interval", "clouds_yaml", "clouds", "stores", "images",
            "metrics_listen", "max_transfers", "transfer_retries", "check_max_age",
            "log_format", "log_level")
CLOUD_COMMON_KEYS = ("region_name", "interface", "verify", "timeout", "max_transfers",
                     "endpoint_override")
CLOUD_KEYS = ("cloud", "auth", "auth_type", *CLOUD_COMMON_KEYS)
STORE_TYPES = ("directory", "vospace")
DIRECTORY_KEYS = ("type", "path", "max_transfers")
#: vospace: ``container`` is the node holding the images (vos://… URI or a path under /nodes);
#: ``certificate`` a PEM proxy certificate; ``token`` a bearer token (a secret)
VOSPACE_KEYS = ("type", "url", "container", "certificate", "token", "verify", "timeout",
                "max_transfers")
RULE_KEYS = ("name", "clouds", "store", "stores", "visibility", "min_copies", "keep", "retire",
             "on_mismatch")
VISIBILITIES = ("private", "shared", "community", "public")
RETIRE = ("hide", "delete")
ON_MISMATCH = ("report", "replace")
INTERFACES = ("public", "internal", "admin")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

#: keys that belong one level down, when found at the top level
_MISPLACED = {
    **{k: f"{k} belongs to an image rule: move it under images: (- name: ...)"
       for k in RULE_KEYS if k not in TOP_KEYS},
    **{k: f"{k} belongs to a cloud: move it under clouds: NAME:"
       for k in CLOUD_KEYS if k not in TOP_KEYS},
    "type": "type belongs to a store: move it under stores: NAME:",
    "path": "path belongs to a directory store: move it under stores: NAME:",
}
#: what openstacksdk's config loader logs through; kept out of the output while it runs
_SDK_LOGGERS = ("openstack", "stevedore", "keystoneauth")
_PASSWORD_PLUGINS = ("password", "v3password", "v2password")
_APPCRED_PLUGINS = ("v3applicationcredential",)
_TOKEN_PLUGINS = ("token", "v3token", "v2token")
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
DURATION_HINT = "write a duration like 30s, 5m, 1h, 1h30m or 2d (a bare number is seconds)"


# --------------------------------------------------------------------------- durations

def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``2.5``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``.

    Raises ValueError saying what is wrong (not a duration, negative, not finite).
    """
    if isinstance(value, bool):
        raise ValueError("is true/false, not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"[+-]?\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            negative = text.startswith("-")
            body = text.lstrip("+-").replace(" ", "")
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"{value!r} is not a duration")
            units = [u for _, u in parts]
            if units != sorted(set(units), key="dhms".index):
                raise ValueError(f"{value!r}: give each unit once, largest first (like 1h30m)")
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
            if negative:
                seconds = -seconds
    else:
        raise ValueError(f"is {_describe(value)}, not a duration")
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


# --------------------------------------------------------------------------- reading the file

def resolve_config_path(path: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    """The config file to read: ``-c PATH``, else ``$IMAGESYNC_CONFIG``, else the default."""
    if path is not None:
        return Path(path)
    from_env = env.get(CONFIG_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_CONFIG_PATH


def _join(prefix: str, name: object) -> str:
    text = str(name)
    part = text if _SIMPLE_KEY.fullmatch(text) else f"[{json.dumps(text)}]"
    if not prefix or part.startswith("["):
        return prefix + part
    return f"{prefix}.{part}"


def _index(prefix: str, i: int) -> str:
    return f"{prefix}[{i}]"


def _describe(value: object) -> str:
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


def _oneline(text: object) -> str:
    """A library's message as one secret-free line, without a closing period."""
    return redact(" ".join(str(text).split())).rstrip(".")


def _suggest(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}? " if match else ""


class _Lines:
    """Where each key path sits in the file (for messages), and duplicate keys (which PyYAML
    silently collapses: the last one wins, which is never what the writer meant)."""

    def __init__(self) -> None:
        self.line: dict[str, int] = {}
        self.duplicates: list[tuple[str, int, int]] = []  # key, first line, repeated line
        self._merged: set[str] = set()

    def walk(self, node: yaml.Node, prefix: str, stack: tuple[int, ...] = (),
             merged: bool = False) -> None:
        if id(node) in stack:  # a recursive alias
            return
        stack += (id(node),)
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                if knode.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                    self.walk(vnode, prefix, stack, merged=True)
                    continue
                if not isinstance(knode, yaml.ScalarNode):
                    continue
                key = _join(prefix, knode.value)
                line = knode.start_mark.line + 1
                if merged:
                    self._merged.add(key)
                elif key in self.line and key not in self._merged:
                    self.duplicates.append((key, self.line[key], line))
                self.line.setdefault(key, line)
                self.walk(vnode, key, stack, merged)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                key = _index(prefix, i)
                self.line.setdefault(key, item.start_mark.line + 1)
                self.walk(item, key, stack, merged)

    def find(self, key: str | None) -> int | None:
        while key:
            if key in self.line:
                return self.line[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return None


class _Doc:
    """One configuration file being validated: raises errors that name file, line and key."""

    def __init__(self, path: Path, lines: _Lines, env: Mapping[str, str]) -> None:
        self.file = path
        self.lines = lines
        self.env = env
        self.base = path.absolute().parent

    def fail(self, key: str | None, message: str, line: int | None = None) -> NoReturn:
        err = ConfigError(message, file=str(self.file), key=key)
        line = line or self.lines.find(key)
        if line is not None:
            # editors jump to FILE:LINE; err.file and err.key stay as given
            err.args = (f"{self.file}:{line}: {key}: {message}",)
        raise err

    # typed getters ------------------------------------------------------------------

    def mapping(self, value: object, key: str, hint: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(key, f"is {_describe(value)}; it must be a mapping: {hint}")
        for k in value:
            if not isinstance(k, str):
                self.fail(_join(key, k), f"the key {k!r} is not a string: quote it ('{k}')")
        return dict(value)

    def known_keys(self, value: Mapping[str, Any], key: str, allowed: Iterable[str],
                   elsewhere: Mapping[str, str] | None = None) -> None:
        allowed = tuple(allowed)
        for k in value:
            if k not in allowed:
                if elsewhere and k in elsewhere:
                    self.fail(_join(key, k), f"not a key here: {elsewhere[k]}")
                hint = _suggest(k, allowed)
                self.fail(_join(key, k), f"unknown key: {hint}remove it or use one of: "
                          f"{', '.join(allowed)}")

    def string(self, value: object, key: str, what: str = "a string") -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(key, f"is {_describe(value)}; write {what}")
        text = str(value).strip()
        if not text:
            self.fail(key, f"is empty; write {what}")
        return text

    def choice(self, value: object, key: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            shown = repr(value) if isinstance(value, str) else _describe(value)
            hint = _suggest(value, choices) if isinstance(value, str) else ""
            self.fail(key, f"{shown} is not allowed: {hint}use one of: {', '.join(choices)}")
        return value.strip().lower()

    def integer(self, value: object, key: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                what = "a positive whole number" if minimum > 0 else "a whole number ≥ 0"
                self.fail(key, f"is {_describe(value)}; write {what} like {max(minimum, 1)}")
        if value < minimum:
            what = "positive (1 or more)" if minimum == 1 else f"at least {minimum}"
            self.fail(key, f"is {value}; it must be {what}")
        return value

    def duration(self, value: object, key: str, allow_zero: bool = False) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(key, f"{exc}: {DURATION_HINT}")
        if seconds == 0 and not allow_zero:
            self.fail(key, f"is zero: {DURATION_HINT}")
        return seconds

    def path(self, value: object, key: str) -> Path:
        """A path; relative paths are relative to the config file's directory."""
        p = Path(self.string(value, key, "a path")).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else self.base / p))

    def site_name(self, name: str, key: str) -> None:
        if name == "all":
            self.fail(key, "'all' is reserved (clouds: all means every cloud): rename the site")
        if not _SITE_NAME.fullmatch(name):
            self.fail(key, "a site name uses letters, digits, '_', '.' and '-' and starts with a "
                      "letter or digit: rename it")


def _read_document(path: Path, env: Mapping[str, str]) -> tuple[Any, _Doc]:
    where = str(path)
    if path.is_dir():
        raise ConfigError("is a directory, not a file: give the path of the YAML file", file=where)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "file not found: create it (see etc/imagesync.yaml.example), or point -c or "
            f"${CONFIG_ENV} at your configuration", file=where) from None
    except PermissionError:
        raise ConfigError("cannot read the file (permission denied): make it readable by the "
                          "user imagesync runs as", file=where) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start}): save the file as UTF-8",
                          file=where) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=where) from None
    loader = yaml.SafeLoader(text)
    lines = _Lines()
    try:
        node = loader.get_single_node()
        if node is not None:
            lines.walk(node, "")
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "cannot parse"
        if exc.context and exc.problem:
            cm = exc.context_mark
            what += f" ({exc.context}{f' at line {cm.line + 1}' if cm else ''})"
        raise ConfigError(f"invalid YAML{at}: {what}: fix the syntax (indentation, quotes, "
                          "a missing ':' or '-')", file=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}: fix the syntax", file=where) from None
    finally:
        loader.dispose()
    doc = _Doc(path, lines, env)
    for key, first, again in lines.duplicates:
        doc.fail(key, f"duplicate key (first at line {first}); YAML would keep only the last: "
                 "remove or rename one", line=again)
    return data, doc


# --------------------------------------------------------------------------- clouds

@dataclass
class _CloudSpec:
    """A cloud as written, before clouds.yaml entries are resolved."""

    name: str
    key: str
    entry: str | None = None
    auth: dict[str, Any] | None = None
    auth_type: str | None = None
    region_name: str | None = None
    interface: str | None = None
    verify: bool | str | None = None
    timeout: float | None = None
    max_transfers: int = 2
    endpoint_override: str | None = None


def _parse_cloud(doc: _Doc, name: str, raw: object, key: str) -> _CloudSpec:
    hint = "write `cloud: ENTRY` (an entry of clouds.yaml) or `auth:` with auth_url and credentials"
    body = doc.mapping(raw, key, hint)
    doc.known_keys(body, key, CLOUD_KEYS)
    spec = _CloudSpec(name=name, key=key)
    if "cloud" in body and "auth" in body:
        doc.fail(key, "has both `cloud:` and `auth:`: keep one (the clouds.yaml entry, or the "
                 "inline credentials)")
    if "cloud" not in body and "auth" not in body:
        doc.fail(key, f"has neither `cloud:` nor `auth:`: {hint}")
    if "region_name" in body:
        spec.region_name = doc.string(body["region_name"], _join(key, "region_name"))
    if "interface" in body:
        spec.interface = doc.choice(body["interface"], _join(key, "interface"), INTERFACES)
    if "verify" in body:
        spec.verify = _verify(doc, body["verify"], _join(key, "verify"))
    if "timeout" in body:
        spec.timeout = doc.duration(body["timeout"], _join(key, "timeout"))
    if "max_transfers" in body:
        spec.max_transfers = doc.integer(body["max_transfers"], _join(key, "max_transfers"), 1)
    if body.get("endpoint_override") is not None:
        spec.endpoint_override = _url(doc, body["endpoint_override"],
                                      _join(key, "endpoint_override"), "https://glance.example:9292")
    if "cloud" in body:
        spec.entry = doc.string(body["cloud"], _join(key, "cloud"),
                                "the name of a clouds.yaml entry")
        if "auth_type" in body:
            doc.fail(_join(key, "auth_type"), "the clouds.yaml entry sets the auth type: remove "
                     "auth_type here (or use inline `auth:` instead of `cloud:`)")
        return spec
    spec.auth_type, spec.auth = _inline_auth(doc, body.get("auth"), body.get("auth_type"), key)
    return spec


def _url(doc: _Doc, value: object, key: str, example: str) -> str:
    url = doc.string(value, key, "a URL")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        doc.fail(key, f"{url!r} is not an http(s) URL: write it like {example}")
    return url


def _verify(doc: _Doc, value: object, key: str) -> bool | str:
    if isinstance(value, bool):
        return value
    path = doc.path(value, key)
    if not path.exists():
        doc.fail(key, f"CA bundle {path} not found: give the path of a PEM file, or true/false")
    return str(path)


def _inline_auth(doc: _Doc, raw: object, raw_type: object, key: str
                 ) -> tuple[str, dict[str, Any]]:
    akey = _join(key, "auth")
    auth: dict[str, str] = {}
    for k, v in doc.mapping(raw, akey, "write auth_url and the credentials under it").items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            # YAML reads 0123 as 83 and 1e3 as 1000.0: credentials must stay exactly as written
            doc.fail(_join(akey, k), "is a number: put the value in quotes so that it is "
                     "kept exactly as written")
        auth[k] = doc.string(v, _join(akey, k))
    has_appcred = any(k.startswith("application_credential") for k in auth)
    if raw_type is not None:
        auth_type = doc.string(raw_type, _join(key, "auth_type"), "a keystoneauth plugin name")
    elif has_appcred and "password" in auth:
        doc.fail(akey, "has both a password and an application credential: keep one")
    elif has_appcred:
        auth_type = "v3applicationcredential"
    elif "token" in auth:
        auth_type = "token"
    else:
        auth_type = "password"

    option_names, required = _auth_options(doc, auth_type, key)
    doc.known_keys(auth, akey, option_names)
    if "auth_url" not in auth:
        doc.fail(_join(akey, "auth_url"), "missing: add it (the Keystone URL, like "
                 "https://keystone.example.org:5000/v3)")
    _url(doc, auth["auth_url"], _join(akey, "auth_url"), "https://keystone.example.org:5000/v3")
    problem = _credential_problem(auth_type, auth, required)
    if problem:
        sub, message = problem
        doc.fail(_join(akey, sub) if sub else akey, message)
    if auth_type != "v2password":
        # Keystone v3 needs a domain for names; "Default" is what every single-domain cloud uses.
        if "username" in auth and not ({"user_domain_name", "user_domain_id"} & auth.keys()):
            auth["user_domain_name"] = "Default"
        if "project_name" in auth and not ({"project_domain_name", "project_domain_id"}
                                           & auth.keys()):
            auth["project_domain_name"] = "Default"
    return auth_type, dict(auth)


_SCOPE = ("auth_url", "system_scope", "domain_id", "domain_name", "project_id", "project_name",
          "project_domain_id", "project_domain_name", "trust_id")
_USER = ("user_id", "username", "user_domain_id", "user_domain_name")
#: keystoneauth's options for the common auth types, so that loading a configuration does not
#: import keystoneauth (0.1-0.2 s, which `imagesync check` pays on every boot). A unit test
#: holds this table to keystoneauth's own ``get_options()``.
KNOWN_AUTH_OPTIONS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "password": ((*_SCOPE, "default_domain_id", "default_domain_name", *_USER, "password"),
                 ("auth_url",)),
    "v3password": ((*_SCOPE, *_USER, "password"), ("auth_url",)),
    "v3applicationcredential": ((*_SCOPE, *_USER, "application_credential_secret",
                                 "application_credential_id", "application_credential_name"),
                                ("auth_url", "application_credential_secret")),
    "token": ((*_SCOPE, "default_domain_id", "default_domain_name", "token"), ("auth_url",)),
    "v3token": ((*_SCOPE, "token"), ("auth_url",)),
}


def _auth_options(doc: _Doc, auth_type: str, key: str) -> tuple[list[str], list[str]]:
    """(option names, required ones) of a keystoneauth plugin."""
    if auth_type in KNOWN_AUTH_OPTIONS:
        names, required = KNOWN_AUTH_OPTIONS[auth_type]
        return list(names), list(required)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # from optional deps it imports
        from keystoneauth1 import exceptions as ks_exc
        from keystoneauth1 import loading

    try:
        loader: Any = loading.get_plugin_loader(auth_type)
    except ks_exc.NoMatchingPlugin:
        known = sorted(loading.get_available_plugin_names())
        doc.fail(_join(key, "auth_type"), f"unknown auth type {auth_type!r}: "
                 f"{_suggest(auth_type, known)}use one of: {', '.join(known)}")
    options = loader.get_options()
    return [o.dest for o in options], [o.dest for o in options if o.required]


_NO_CREDENTIALS = ("no credentials: add username, password and project_name (a password login), "
                   "or application_credential_id and application_credential_secret (an "
                   "application credential)")


def _credential_problem(auth_type: str, auth: Mapping[str, Any], required: Iterable[str]
                        ) -> tuple[str, str] | None:
    """(sub-key, message) for the first missing credential, or None when complete."""
    def missing(*names: str) -> bool:
        return not any(auth.get(n) for n in names)

    if auth_type in _PASSWORD_PLUGINS:
        if missing("username", "user_id", "password"):
            return "", _NO_CREDENTIALS
        if missing("username", "user_id"):
            return "username", "missing: add it (or user_id)"
        if missing("password"):
            return "password", "missing: add it"
    elif auth_type in _APPCRED_PLUGINS:
        if missing("application_credential_id", "application_credential_name",
                   "application_credential_secret"):
            return "", _NO_CREDENTIALS
        if missing("application_credential_secret"):
            return "application_credential_secret", "missing: add it"
        if missing("application_credential_id", "application_credential_name"):
            return "application_credential_id", "missing: add it (or application_credential_name" \
                " with username)"
        if missing("application_credential_id") and missing("username", "user_id"):
            return "username", "missing: an application credential given by name needs the " \
                "username (or user_id) of its owner: add it, or use application_credential_id"
        return None  # an application credential carries its own project
    elif auth_type in _TOKEN_PLUGINS and missing("token"):
        return "token", "missing: add it"
    for name in required:
        if missing(name):
            return name, "missing: add it"
    if auth_type in _PASSWORD_PLUGINS + _TOKEN_PLUGINS and missing("project_name", "project_id"):
        return "project_name", ("missing: add project_name (or project_id): imagesync needs a "
                                "project-scoped token to reach Glance")
    return None


def _clouds_yaml_files(clouds_yaml: Path | None, env: Mapping[str, str]
                       ) -> tuple[list[str], list[str], str]:
    """(config files, secure files, how the search is described in messages)."""
    from openstack.config import loader as os_loader

    if clouds_yaml is not None:
        secure = [str(clouds_yaml.with_name("secure" + s)) for s in (".yaml", ".yml")]
        return [str(clouds_yaml)], secure, f"{clouds_yaml} (clouds_yaml)"
    files = list(os_loader.CONFIG_FILES)
    secure = list(os_loader.SECURE_FILES)
    dirs = list(dict.fromkeys(os.path.dirname(f) for f in files))
    desc = f"clouds.yaml, clouds.yml, clouds.json in {', '.join(dirs)}"
    override = env.get("OS_CLIENT_CONFIG_FILE", "").strip()
    if override:
        files.insert(0, override)
        exists = "" if os.path.exists(override) else ", which does not exist"
        desc = f"$OS_CLIENT_CONFIG_FILE={override}{exists}, then {desc}"
    secure_override = env.get("OS_CLIENT_SECURE_FILE", "").strip()
    if secure_override:
        secure.insert(0, secure_override)
    return files, secure, desc


def _resolve_clouds(doc: _Doc, specs: list[_CloudSpec], clouds_yaml: Path | None
                    ) -> dict[str, CloudConfig]:
    out: dict[str, CloudConfig] = {}
    entries = [s for s in specs if s.entry is not None]
    osc: Any = None
    skipped = searched = ""
    if entries:
        from imagesync.logs import captured_library_logs

        with warnings.catch_warnings(), captured_library_logs(_SDK_LOGGERS) as records:
            warnings.simplefilter("ignore")
            from openstack.config import loader as os_loader

            files, secure, searched = _clouds_yaml_files(clouds_yaml, doc.env)
            try:
                osc = os_loader.OpenStackConfig(config_files=files, secure_files=secure,
                                                load_envvars=False)
            except Exception as exc:  # openstacksdk raises several kinds; all mean "bad file"
                doc.fail("clouds_yaml" if clouds_yaml else _join(entries[0].key, "cloud"),
                         f"cannot read clouds.yaml: {_oneline(exc)}: fix that file")
        # openstacksdk skips a clouds.yaml it cannot parse and only logs it: say so
        skipped = "; ".join(
            f"{r.args[0]} is not valid YAML or JSON ({_oneline(r.args[1])})"
            if isinstance(r.args, tuple) and len(r.args) == 2 else _oneline(r.getMessage())
            for r in records if r.msg.startswith("Skipping config file"))
    for spec in specs:
        if spec.entry is None:
            assert spec.auth is not None and spec.auth_type is not None
            out[spec.name] = CloudConfig(
                name=spec.name, auth=spec.auth, auth_type=spec.auth_type,
                region_name=spec.region_name, interface=spec.interface or "public",
                verify=True if spec.verify is None else spec.verify,
                timeout=spec.timeout or 60.0, max_transfers=spec.max_transfers,
                endpoint_override=spec.endpoint_override)
        else:
            out[spec.name] = _from_clouds_yaml(doc, spec, osc, searched, skipped)
    for cloud in out.values():
        for k, v in cloud.auth.items():
            if is_secret_key(k):
                register_secret(v)
    return out


def _from_clouds_yaml(doc: _Doc, spec: _CloudSpec, osc: Any, searched: str, skipped: str
                      ) -> CloudConfig:
    key = _join(spec.key, "cloud")
    entry = cast(str, spec.entry)
    found = osc.config_filename
    # with no file found, openstacksdk invents a "defaults" entry: not one of the user's
    names = list(osc.cloud_config.get("clouds", {})) if found else []
    note = f" (skipped {skipped})" if skipped else ""
    if not found:
        doc.fail(key, f"no clouds.yaml found{note}; searched {searched}: create one with an "
                 f"entry {entry!r}, set clouds_yaml:, or set $OS_CLIENT_CONFIG_FILE")
    if entry not in names:
        doc.fail(key, f"no entry {entry!r} in {found}{note}: {_suggest(entry, names)}"
                 f"entries there: {', '.join(names) or 'none'}; searched {searched}: "
                 "add the entry or fix the name")
    kwargs = {"region_name": spec.region_name} if spec.region_name else {}
    from imagesync.logs import captured_library_logs

    with warnings.catch_warnings(), captured_library_logs(_SDK_LOGGERS):
        warnings.simplefilter("ignore")
        try:
            region = osc.get_one(cloud=entry, **kwargs)
        except Exception as exc:  # keystoneauth and openstacksdk errors: the entry is wrong
            doc.fail(key, f"clouds.yaml entry {entry!r} in {found} is not usable: "
                     f"{_oneline(exc)}: fix the entry")
    cfg = region.config
    auth = {k: v for k, v in dict(cfg.get("auth") or {}).items() if v not in (None, "")}
    auth_type = str(cfg.get("auth_type") or "password")
    for k, v in auth.items():
        if is_secret_key(k):
            register_secret(v)
    problem = _credential_problem(auth_type, auth, ["auth_url"])
    if problem:
        sub, message = problem
        doc.fail(key, f"clouds.yaml entry {entry!r} in {found}: "
                 f"{(sub + ' ') if sub else ''}{message} (in the entry's auth:, or secure.yaml)")
    verify: bool | str = region.get_requests_verify_args()[0]
    if spec.verify is not None:
        verify = spec.verify
    timeout = spec.timeout
    if timeout is None:
        try:
            timeout = float(cfg.get("api_timeout") or 60.0)
        except (TypeError, ValueError):
            timeout = 60.0
    return CloudConfig(
        name=spec.name, auth=auth, auth_type=auth_type,
        region_name=region.region_name or None,
        interface=spec.interface or str(cfg.get("interface") or "public"),
        verify=verify, cloud=entry, timeout=timeout, max_transfers=spec.max_transfers,
        endpoint_override=spec.endpoint_override or region.get_endpoint("image") or None)


# --------------------------------------------------------------------------- stores, rules

def _parse_store(doc: _Doc, name: str, raw: object, key: str) -> StoreConfig:
    body = doc.mapping(raw, key, "write `type: directory` and `path: /srv/imagesync`")
    if "type" not in body:
        doc.fail(_join(key, "type"), f"missing: add it (one of: {', '.join(STORE_TYPES)})")
    kind = doc.choice(body["type"], _join(key, "type"), STORE_TYPES)
    max_transfers = 2
    if "max_transfers" in body:
        max_transfers = doc.integer(body["max_transfers"], _join(key, "max_transfers"), 1)
    if kind == "directory":
        doc.known_keys(body, key, DIRECTORY_KEYS)
        pkey = _join(key, "path")
        if "path" not in body:
            doc.fail(pkey, "missing: add it (an absolute directory path, like /srv/imagesync)")
        path = Path(doc.string(body["path"], pkey, "an absolute path")).expanduser()
        if not path.is_absolute():
            doc.fail(pkey, f"{str(path)!r} is relative: write an absolute path, like "
                     "/srv/imagesync")
        return StoreConfig(name=name, type="directory", path=path, max_transfers=max_transfers)
    doc.known_keys(body, key, VOSPACE_KEYS)
    ukey = _join(key, "url")
    if "url" not in body:
        doc.fail(ukey, "missing: add it (the service's base URL, like "
                 "https://ws-cadc.canfar.net/vault)")
    url = _url(doc, body["url"], ukey, "https://ws-cadc.canfar.net/vault")
    options: dict[str, Any] = {}
    for opt in ("container", "token"):
        if opt in body:
            options[opt] = doc.string(body[opt], _join(key, opt))
    if "certificate" in body:
        cert = doc.path(body["certificate"], _join(key, "certificate"))
        options["certificate"] = str(cert)
    if "verify" in body:
        options["verify"] = _verify(doc, body["verify"], _join(key, "verify"))
    if "timeout" in body:
        options["timeout"] = doc.duration(body["timeout"], _join(key, "timeout"))
    register_secret(options.get("token"))
    return StoreConfig(name=name, type="vospace", url=url.rstrip("/"),
                       max_transfers=max_transfers, options=options)


def _check_pattern(doc: _Doc, value: object, key: str) -> str:
    if not isinstance(value, str):
        doc.fail(key, f"is {_describe(value)}; write the image name or a glob like "
                 "'canfar-batch-*' (quote it)")
    if not value.strip():
        doc.fail(key, "is empty: write the image name or a glob like 'canfar-batch-*'")
    if value != value.strip():
        doc.fail(key, f"{value!r} begins or ends with spaces: remove them")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        doc.fail(key, f"{value!r} contains control characters: remove them")
    if len(value) > 255:
        doc.fail(key, "is longer than 255 characters, the longest name Glance accepts")
    i = 0
    while i < len(value):
        if value[i] == "[":
            j = i + 1
            if j < len(value) and value[j] == "!":
                j += 1
            if j < len(value) and value[j] == "]":
                j += 1
            close = value.find("]", j)
            if close < 0:
                doc.fail(key, f"{value!r} has a '[' that is never closed: close the set, or "
                         "write [[] to match a literal '['")
            i = close
        i += 1
    return value


def _site_list(doc: _Doc, value: object, key: str, kind: str, known: Mapping[str, object],
               other: Mapping[str, object], other_key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        doc.fail(key, f"is {_describe(value)}; write a list of {kind} names like [a, b]")
    names: list[str] = []
    for i, item in enumerate(items):
        ikey = _index(key, i) if not isinstance(value, str) else key
        if not isinstance(item, str):
            doc.fail(ikey, f"is {_describe(item)}; write a {kind} name")
        if item not in known:
            if item in other:
                where = ("list it under clouds:" if other_key == "clouds"
                         else "use store: or stores:")
                doc.fail(ikey, f"{item!r} is not a {kind} but a {other_key[:-1]}: {where}")
            choices = list(known)
            doc.fail(ikey, f"no {kind} named {item!r}: {_suggest(item, choices)}"
                     f"use one of: {', '.join(choices) or f'(no {kind}s are configured)'}")
        if item in names:
            doc.fail(ikey, f"{item!r} is listed twice: remove one")
        names.append(item)
    return tuple(names)


def _parse_rule(doc: _Doc, raw: object, key: str, clouds: Mapping[str, object],
                stores: Mapping[str, object]) -> ImageRule:
    body = doc.mapping(raw, key, "write `- name: PATTERN` with clouds:/store:")
    if not body:
        doc.fail(key, "is empty: write `- name: PATTERN` with clouds: and store:")
    doc.known_keys(body, key, RULE_KEYS)
    if "name" not in body:
        doc.fail(_join(key, "name"), "missing: add it (the image name or a glob like "
                 "'canfar-batch-*')")
    pattern = _check_pattern(doc, body["name"], _join(key, "name"))
    ckey = _join(key, "clouds")
    raw_clouds = body.get("clouds", "all")
    if raw_clouds == "all":
        rule_clouds = tuple(clouds)
    else:
        rule_clouds = _site_list(doc, raw_clouds, ckey, "cloud", clouds, stores, "stores")
    if "store" in body and "stores" in body:
        doc.fail(_join(key, "stores"), "both store: and stores: are given: keep one")
    rule_stores: tuple[str, ...] = ()
    if "store" in body:
        skey = _join(key, "store")
        if not isinstance(body["store"], str):
            doc.fail(skey, f"is {_describe(body['store'])}; store: takes one name (for several "
                     "write stores: [a, b])")
        rule_stores = _site_list(doc, body["store"], skey, "store", stores, clouds, "clouds")
    elif "stores" in body:
        rule_stores = _site_list(doc, body["stores"], _join(key, "stores"), "store", stores,
                                 clouds, "clouds")
    sites = rule_clouds + rule_stores
    if not sites:
        doc.fail(key, "names no site: give clouds: (a list, or all) or store:")
    visibility = "private"
    if "visibility" in body:
        visibility = doc.choice(body["visibility"], _join(key, "visibility"), VISIBILITIES)
    min_copies = 0
    if "min_copies" in body:
        min_copies = doc.integer(body["min_copies"], _join(key, "min_copies"), 0)
        if min_copies > len(sites):
            doc.fail(_join(key, "min_copies"), f"is {min_copies} but the rule names only "
                     f"{len(sites)} site(s) ({', '.join(sites)}): lower it or add sites")
    keep = None
    if body.get("keep") is not None:
        keep = doc.integer(body["keep"], _join(key, "keep"), 1)
    retire = "hide"
    if "retire" in body:
        retire = doc.choice(body["retire"], _join(key, "retire"), RETIRE)
    on_mismatch = "report"
    if "on_mismatch" in body:
        on_mismatch = doc.choice(body["on_mismatch"], _join(key, "on_mismatch"), ON_MISMATCH)
    return ImageRule(
        pattern=pattern, clouds=rule_clouds, stores=rule_stores,
        visibility=cast(Literal["private", "shared", "community", "public"], visibility),
        min_copies=min_copies, keep=keep, retire=cast(Literal["hide", "delete"], retire),
        on_mismatch=cast(Literal["report", "replace"], on_mismatch))


def _listen(doc: _Doc, value: object, key: str) -> str:
    hint = "write host:port like 127.0.0.1:9780 (or [::1]:9780)"
    if not isinstance(value, str):
        doc.fail(key, f"is {_describe(value)}; {hint}")
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", value.strip())
    if not m:
        doc.fail(key, f"{value!r} is not host:port: {hint}")
    if not 1 <= int(m.group(2)) <= 65535:
        doc.fail(key, f"port {m.group(2)} is out of range: use 1-65535")
    return value.strip()


# --------------------------------------------------------------------------- load

def load_config(path: Path | None = None, env: Mapping[str, str] = os.environ, *,
                resolve_clouds: bool = True) -> Config:
    """Read, validate and resolve the configuration; raise ConfigError on the first mistake.

    ``resolve_clouds=False`` skips reading clouds.yaml (and importing openstacksdk, ~0.5 s):
    clouds named by ``cloud:`` then have empty ``auth``. Only for callers that will not talk
    to a cloud, such as ``check`` answering from recorded state; they reload to go further.
    """
    file = resolve_config_path(path, env)
    data, doc = _read_document(file, env)
    if data is None:
        doc.fail(None, "the file is empty: it needs at least `clouds:` or `stores:` (see "
                 "etc/imagesync.yaml.example)")
    if not isinstance(data, Mapping):
        doc.fail(None, f"the top level is {_describe(data)}; it must be a mapping of keys like "
                 "clouds:, stores:, images:")
    # top-level keys starting with "x-" are the writer's own (YAML anchors to merge with <<)
    top = {k: v for k, v in doc.mapping(data, "", "").items() if not k.startswith("x-")}
    doc.known_keys(top, "", TOP_KEYS, _MISPLACED)

    state_dir = doc.path(top["state_dir"], "state_dir") if "state_dir" in top \
        else DEFAULT_STATE_DIR
    poll = doc.duration(top["poll_interval"], "poll_interval") if "poll_interval" in top \
        else DEFAULT_POLL_INTERVAL
    check_max_age = 600.0
    if "check_max_age" in top:
        check_max_age = doc.duration(top["check_max_age"], "check_max_age", allow_zero=True)
    max_transfers = 4
    if "max_transfers" in top:
        max_transfers = doc.integer(top["max_transfers"], "max_transfers", 1)
    retries = doc.integer(top["transfer_retries"], "transfer_retries", 0) \
        if "transfer_retries" in top else 3
    metrics = _listen(doc, top["metrics_listen"], "metrics_listen") \
        if top.get("metrics_listen") is not None else None
    log_format = doc.choice(top["log_format"], "log_format", LOG_FORMATS) \
        if "log_format" in top else "auto"
    log_level = doc.choice(top["log_level"], "log_level", LOG_LEVELS) \
        if "log_level" in top else "info"
    clouds_yaml = None
    if top.get("clouds_yaml") is not None:
        clouds_yaml = doc.path(top["clouds_yaml"], "clouds_yaml")
        if not clouds_yaml.is_file():
            doc.fail("clouds_yaml", f"{clouds_yaml} is not a file: fix the path, or remove "
                     "clouds_yaml to use the standard clouds.yaml search path")

    site_hint = "NAME: {...} entries"
    raw_stores = doc.mapping(top.get("stores"), "stores", f"write store {site_hint}")
    raw_clouds = doc.mapping(top.get("clouds"), "clouds", f"write cloud {site_hint}")
    if not raw_clouds and not raw_stores:
        doc.fail("clouds", "no sites: add at least one cloud under clouds: (or one store under "
                 "stores:)")
    for name in raw_clouds:
        doc.site_name(name, _join("clouds", name))
    for name in raw_stores:
        doc.site_name(name, _join("stores", name))
        if name in raw_clouds:
            doc.fail(_join("stores", name), f"{name!r} is also a cloud (clouds.{name}): site "
                     "names must be unique across clouds and stores: rename one")
    stores = {n: _parse_store(doc, n, v, _join("stores", n)) for n, v in raw_stores.items()}
    specs = [_parse_cloud(doc, n, v, _join("clouds", n)) for n, v in raw_clouds.items()]

    raw_images = top.get("images")
    if raw_images is None:
        raw_images = []
    if not isinstance(raw_images, list):
        doc.fail("images", f"is {_describe(raw_images)}; it must be a list of rules "
                 "(`- name: PATTERN`)")
    rules: list[ImageRule] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_images):
        rule = _parse_rule(doc, raw, _index("images", i), raw_clouds, stores)
        if rule.pattern in seen:
            doc.fail(_join(_index("images", i), "name"), f"{rule.pattern!r} is already the "
                     f"pattern of images[{seen[rule.pattern]}]: merge the two rules")
        seen[rule.pattern] = i
        rules.append(rule)

    if resolve_clouds:
        clouds = _resolve_clouds(doc, specs, clouds_yaml)
    else:
        clouds = {sp.name: CloudConfig(name=sp.name, auth={}, auth_type="unresolved",
                                       cloud=sp.entry) for sp in specs}
    return Config(
        path=file.absolute(), state_dir=state_dir, poll_interval=poll, clouds=clouds,
        stores=stores, images=tuple(rules), metrics_listen=metrics,
        max_transfers=max_transfers, transfer_retries=retries, check_max_age=check_max_age,
        log_format=cast(Literal["auto", "json", "console"], log_format), log_level=log_level)


# --------------------------------------------------------------------------- show

class _Dumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(x, str | int | float) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def render_config(config: Config) -> str:
    """The effective configuration as YAML: clouds resolved, durations normalised, every secret
    shown as ``********``."""
    clouds: dict[str, Any] = {}
    for c in config.clouds.values():
        entry: dict[str, Any] = {"cloud": c.cloud} if c.cloud else {}
        entry.update(auth_type=c.auth_type, auth=dict(c.auth), region_name=c.region_name,
                     interface=c.interface, verify=c.verify,
                     timeout=format_duration(c.timeout), max_transfers=c.max_transfers)
        if c.endpoint_override:
            entry["endpoint_override"] = c.endpoint_override
        clouds[c.name] = entry
    stores: dict[str, Any] = {}
    for s in config.stores.values():
        body: dict[str, Any] = {"type": s.type}
        if s.path is not None:
            body["path"] = str(s.path)
        if s.url is not None:
            body["url"] = s.url
        body.update(s.options)
        body["max_transfers"] = s.max_transfers
        stores[s.name] = body
    data: dict[str, Any] = {
        "state_dir": str(config.state_dir),
        "poll_interval": format_duration(config.poll_interval),
        "max_transfers": config.max_transfers,
        "transfer_retries": config.transfer_retries,
        "check_max_age": format_duration(config.check_max_age),
        "metrics_listen": config.metrics_listen,
        "log_format": config.log_format,
        "log_level": config.log_level,
        "clouds": clouds,
        "stores": stores,
        "images": [
            {"name": r.pattern, "clouds": list(r.clouds), "stores": list(r.stores),
             "visibility": r.visibility, "min_copies": r.min_copies, "keep": r.keep,
             "retire": r.retire, "on_mismatch": r.on_mismatch}
            for r in config.images
        ],
    }
    header = (f"# effective configuration of {config.path}\n" if config.path else "") + \
        "# clouds.yaml entries resolved; secrets shown as ********\n"
    body_text = yaml.dump(mask(data), Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                          default_flow_style=False)
    return header + body_text
