"""Read a configuration file → one checked, frozen :class:`~imagesync.config.types.Config`.

``load_config`` reads the file, checks everything (unknown keys with a suggestion, types,
durations, references between rules and sites, credentials) and returns a :class:`Config`,
or raises one :class:`~imagesync.errors.ConfigError` whose message reads like
``/etc/imagesync/imagesync.yaml:31: images[2].clouds[1]: no cloud named 'uvc': did you mean
'uvic'? …``. ``cloud: ENTRY`` sites are resolved through openstacksdk's clouds.yaml loader
(:mod:`imagesync.sites.openstack_auth`, the only place that imports it), so the usual search
path, ``$OS_CLIENT_CONFIG_FILE`` and ``secure.yaml`` work as for the ``openstack`` command.
Every secret read is registered with :mod:`imagesync.secrets` so that logs mask it.

The annotated example of every key is ``imagesync/data/imagesync.yaml.example`` (printed by
``imagesync config example``); the file reader is
:mod:`imagesync.config.document`, image rules are :mod:`imagesync.config.rules`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

from imagesync.config.coordination import parse_coordination
from imagesync.config.document import Document, index, join, read_document, suggest
from imagesync.config.rules import parse_rules
from imagesync.config.types import (
    CADC_REGISTRY,
    CHECK_MAX_AGE_RANGE,
    CLOUD_KEYS,
    COMPRESSIONS,
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_EMPTY_LISTING_PASSES,
    DEFAULT_FULL_LIST_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_STATE_DIR,
    DIRECTORY_KEYS,
    EMPTY_LISTING_PASSES_MAX,
    FULL_LIST_INTERVAL_BOUNDS,
    INTERFACES,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_TRANSFERS_RANGE,
    POLL_INTERVAL_RANGE,
    RULE_KEYS,
    STORE_TYPES,
    TIMEOUT_RANGE,
    TOP_KEYS,
    TRANSFER_RETRIES_RANGE,
    VOSPACE_KEYS,
    CloudConfig,
    Config,
    StoreConfig,
    VOSpaceConfig,
    describe,
    format_duration,
    listens_on_loopback,
)
from imagesync.secrets import is_secret_key, register_secret
from imagesync.sites import openstack_auth, store_kinds
from imagesync.sites.openstack_auth import CloudsYaml, OpenStackConfigError

#: keys that belong one level down, when found at the top level
_MISPLACED = {
    **{
        k: f"{k} belongs to an image rule: move it under images: (- name: ...)"
        for k in RULE_KEYS
        if k not in TOP_KEYS
    },
    **{
        k: f"{k} belongs to a cloud: move it under clouds: NAME:"
        for k in CLOUD_KEYS
        if k not in TOP_KEYS
    },
    "type": "type belongs to a store: move it under stores: NAME:",
    "path": "path belongs to a directory store: move it under stores: NAME:",
}
_KEYSTONE_EXAMPLE = "https://keystone.example.org:5000/v3"
_VOSPACE_EXAMPLE = "https://ws-cadc.canfar.net/vault"


def resolve_config_path(path: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    """The config file to read: ``-c PATH``, else ``$IMAGESYNC_CONFIG``, else the default."""
    if path is not None:
        return Path(path)
    from_env = env.get(CONFIG_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_CONFIG_PATH


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
    trusted_owners: tuple[str, ...] = ()


_OWNERS_HINT = "write a list of project ids, like [0123456789abcdef0123456789abcdef]"


def _owners(doc: Document, raw: object, key: str) -> tuple[str, ...]:
    """``trusted_owners:``: project ids (Keystone ids, not names: a name can be reused)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        doc.fail(key, f"is {describe(raw)}; {_OWNERS_HINT}")
    owners: list[str] = []
    for i, item in enumerate(raw):
        ikey = index(key, i)
        if isinstance(item, int | float) and not isinstance(item, bool):
            # YAML reads an all-digit id as a number, and 1e3 as 1000.0: ids must stay as written
            doc.fail(ikey, "is a number: put the project id in quotes")
        owner = doc.string(item, ikey, "a project id")
        if any(ch.isspace() or not ch.isprintable() for ch in owner):
            doc.fail(ikey, f"{owner!r} is not a project id: {_OWNERS_HINT}")
        if owner not in owners:
            owners.append(owner)
    return tuple(owners)


def _parse_cloud(doc: Document, name: str, raw: object, key: str) -> _CloudSpec:
    hint = "write `cloud: ENTRY` (an entry of clouds.yaml) or `auth:` with auth_url and credentials"
    body = doc.mapping(raw, key, hint)
    doc.known_keys(body, key, CLOUD_KEYS)
    spec = _CloudSpec(name=name, key=key)
    if "cloud" in body and "auth" in body:
        doc.fail(
            key,
            "has both `cloud:` and `auth:`: keep one (the clouds.yaml entry, or the "
            "inline credentials)",
        )
    if "cloud" not in body and "auth" not in body:
        doc.fail(key, f"has neither `cloud:` nor `auth:`: {hint}")
    if "region_name" in body:
        spec.region_name = doc.string(body["region_name"], join(key, "region_name"))
    if "interface" in body:
        spec.interface = doc.choice(body["interface"], join(key, "interface"), INTERFACES)
    if "verify" in body:
        spec.verify = doc.verify(body["verify"], join(key, "verify"))
    if "timeout" in body:
        spec.timeout = doc.duration(body["timeout"], join(key, "timeout"), within=TIMEOUT_RANGE)
    if "max_transfers" in body:
        spec.max_transfers = _max_transfers(doc, body["max_transfers"], join(key, "max_transfers"))
    spec.trusted_owners = _owners(doc, body.get("trusted_owners"), join(key, "trusted_owners"))
    if body.get("endpoint_override") is not None:
        spec.endpoint_override = doc.url(
            body["endpoint_override"], join(key, "endpoint_override"), "https://glance.example:9292"
        )
    if "cloud" in body:
        spec.entry = doc.string(
            body["cloud"], join(key, "cloud"), "the name of a clouds.yaml entry"
        )
        if "auth_type" in body:
            doc.fail(
                join(key, "auth_type"),
                "the clouds.yaml entry sets the auth type: remove "
                "auth_type here (or use inline `auth:` instead of `cloud:`)",
            )
        return spec
    spec.auth_type, spec.auth = _inline_auth(doc, body.get("auth"), body.get("auth_type"), key)
    return spec


def _auth_type(doc: Document, auth: Mapping[str, str], raw_type: object, key: str) -> str:
    """The keystoneauth plugin: as given, else guessed from the credentials present."""
    has_appcred = any(k.startswith("application_credential") for k in auth)
    if raw_type is not None:
        return doc.string(raw_type, join(key, "auth_type"), "a keystoneauth plugin name")
    if has_appcred and "password" in auth:
        doc.fail(join(key, "auth"), "has both a password and an application credential: keep one")
    if has_appcred:
        return "v3applicationcredential"
    if "token" in auth:
        return "token"
    return "password"


def _auth_options(doc: Document, auth_type: str, key: str) -> tuple[list[str], list[str]]:
    """(option names, required ones) of a keystoneauth plugin."""
    try:
        return openstack_auth.plugin_options(auth_type)
    except openstack_auth.UnknownAuthType as exc:
        doc.fail(
            join(key, "auth_type"),
            f"unknown auth type {auth_type!r}: "
            f"{suggest(auth_type, exc.known)}use one of: {', '.join(exc.known)}",
        )


def _inline_auth(
    doc: Document, raw: object, raw_type: object, key: str
) -> tuple[str, dict[str, Any]]:
    akey = join(key, "auth")
    auth: dict[str, str] = {}
    for k, v in doc.mapping(raw, akey, "write auth_url and the credentials under it").items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            # YAML reads 0123 as 83 and 1e3 as 1000.0: credentials must stay exactly as written
            doc.fail(
                join(akey, k),
                "is a number: put the value in quotes so that it is kept exactly as written",
            )
        auth[k] = doc.string(v, join(akey, k))
    auth_type = _auth_type(doc, auth, raw_type, key)
    option_names, required = _auth_options(doc, auth_type, key)
    doc.known_keys(auth, akey, option_names)
    if "auth_url" not in auth:
        doc.fail(
            join(akey, "auth_url"), f"missing: add it (the Keystone URL, like {_KEYSTONE_EXAMPLE})"
        )
    doc.url(auth["auth_url"], join(akey, "auth_url"), _KEYSTONE_EXAMPLE)
    problem = openstack_auth.credential_problem(auth_type, auth, required)
    if problem:
        sub, message = problem
        doc.fail(join(akey, sub) if sub else akey, message)
    if auth_type != "v2password":
        # Keystone v3 needs a domain for names; "Default" is what every single-domain cloud uses.
        if "username" in auth and not ({"user_domain_name", "user_domain_id"} & auth.keys()):
            auth["user_domain_name"] = "Default"
        if "project_name" in auth and not (
            {"project_domain_name", "project_domain_id"} & auth.keys()
        ):
            auth["project_domain_name"] = "Default"
    return auth_type, dict(auth)


def _resolve_clouds(
    doc: Document, specs: list[_CloudSpec], clouds_yaml: Path | None
) -> dict[str, CloudConfig]:
    out: dict[str, CloudConfig] = {}
    entries = [s for s in specs if s.entry is not None]
    found: CloudsYaml | None = None
    if entries:
        try:
            found = openstack_auth.read_clouds_yaml(clouds_yaml, doc.env)
        except OpenStackConfigError as exc:
            doc.fail(
                "clouds_yaml" if clouds_yaml else join(entries[0].key, "cloud"),
                f"cannot read clouds.yaml: {exc}: fix that file",
            )
    for spec in specs:
        if spec.entry is None:
            assert spec.auth is not None and spec.auth_type is not None
            out[spec.name] = CloudConfig(
                name=spec.name,
                auth=spec.auth,
                auth_type=spec.auth_type,
                region_name=spec.region_name,
                interface=spec.interface or "public",
                verify=True if spec.verify is None else spec.verify,
                timeout=spec.timeout or 60.0,
                max_transfers=spec.max_transfers,
                endpoint_override=spec.endpoint_override,
                trusted_owners=spec.trusted_owners,
            )
        else:
            assert found is not None
            out[spec.name] = _from_clouds_yaml(doc, spec, found)
    for cloud in out.values():
        for k, v in cloud.auth.items():
            if is_secret_key(k):
                register_secret(v)
    return out


def _from_clouds_yaml(doc: Document, spec: _CloudSpec, clouds: CloudsYaml) -> CloudConfig:
    key = join(spec.key, "cloud")
    entry = cast(str, spec.entry)
    found, names, searched = clouds.found, clouds.entries, clouds.searched
    note = f" (skipped {clouds.skipped})" if clouds.skipped else ""
    if not found:
        doc.fail(
            key,
            f"no clouds.yaml found{note}; searched {searched}: create one with an "
            f"entry {entry!r}, set clouds_yaml:, or set $OS_CLIENT_CONFIG_FILE",
        )
    if entry not in names:
        doc.fail(
            key,
            f"no entry {entry!r} in {found}{note}: {suggest(entry, names)}"
            f"entries there: {', '.join(names) or 'none'}; searched {searched}: "
            "add the entry or fix the name",
        )
    try:
        resolved = openstack_auth.cloud_entry(clouds, entry, spec.region_name)
    except OpenStackConfigError as exc:
        doc.fail(key, f"clouds.yaml entry {entry!r} in {found} is not usable: {exc}: fix the entry")
    for k, v in resolved.auth.items():
        if is_secret_key(k):
            register_secret(v)
    problem = openstack_auth.credential_problem(resolved.auth_type, resolved.auth, ["auth_url"])
    if problem:
        sub, message = problem
        doc.fail(
            key,
            f"clouds.yaml entry {entry!r} in {found}: "
            f"{(sub + ' ') if sub else ''}{message} (in the entry's auth:, or secure.yaml)",
        )
    return CloudConfig(
        name=spec.name,
        auth=resolved.auth,
        auth_type=resolved.auth_type,
        region_name=resolved.region_name,
        interface=spec.interface or resolved.interface,
        verify=resolved.verify if spec.verify is None else spec.verify,
        cloud=entry,
        timeout=resolved.timeout if spec.timeout is None else spec.timeout,
        max_transfers=spec.max_transfers,
        endpoint_override=spec.endpoint_override or resolved.image_endpoint,
        trusted_owners=spec.trusted_owners,
    )


# --------------------------------------------------------------------------- stores


_VOS_CONTAINER = re.compile(r"vos://([A-Za-z0-9.\-_]+)[~!]([A-Za-z0-9.\-_~]+)(/[^?#]*)?")
_IVO = re.compile(r"ivo://[A-Za-z0-9.\-_]+/[A-Za-z0-9.\-_~/]+")
_CONTAINER_EXAMPLE = "vos://cadc.nrc.ca~vault/canfar/images"


def _vos_container(doc: Document, value: object, key: str) -> str:
    """``vos://authority~service/path`` (``!`` accepted), normalised to ``~``, no trailing /."""
    text = doc.string(value, key, f"a vos:// URI like {_CONTAINER_EXAMPLE}")
    m = _VOS_CONTAINER.fullmatch(text)
    if not m or not (m.group(3) or "").strip("/"):
        doc.fail(
            key,
            f"{text!r} is not a container URI: write vos://AUTHORITY~SERVICE/PATH, like "
            f"{_CONTAINER_EXAMPLE} (a path under the service's root is needed)",
        )
    path = "/" + "/".join(p for p in m.group(3).split("/") if p)
    if any(p in (".", "..") for p in path.split("/")):
        doc.fail(key, f"{text!r}: '.' and '..' are not allowed in the container's path")
    return f"vos://{m.group(1)}~{m.group(2)}{path}"


def _existing_file(doc: Document, value: object, key: str, what: str) -> Path:
    path = doc.path(value, key)
    if not path.is_file():
        doc.fail(key, f"{path} is not a file: {what}")
    return path


def _parse_vospace(
    doc: Document, name: str, body: Mapping[str, Any], key: str, max_transfers: int
) -> StoreConfig:
    if "token" in body:
        doc.fail(
            join(key, "token"),
            "a token is not written in the configuration: put it in a file readable only by "
            "imagesync and name that file with token_file: (it is re-read, so it can be rotated)",
        )
    doc.known_keys(body, key, VOSPACE_KEYS)
    ckey = join(key, "container")
    if "container" not in body:
        doc.fail(
            ckey, f"missing: add it (the container holding the images, like {_CONTAINER_EXAMPLE})"
        )
    container = _vos_container(doc, body["container"], ckey)
    caps: str | None = None
    if body.get("url") is not None:
        # a capabilities URL, or the service's base URL (VOSI puts capabilities under it)
        caps = doc.url(body["url"], join(key, "url"), _VOSPACE_EXAMPLE).rstrip("/")
        if not caps.endswith("/capabilities"):
            caps += "/capabilities"
    resource_id: str | None = None
    if body.get("resource_id") is not None:
        rkey = join(key, "resource_id")
        resource_id = doc.string(body["resource_id"], rkey, "an ivo:// resource ID")
        if not _IVO.fullmatch(resource_id):
            doc.fail(rkey, f"{resource_id!r} is not a resource ID: write ivo://AUTHORITY/SERVICE")
        if caps is not None:
            doc.fail(rkey, "give the service by url: or by resource_id:, not both")
    registry = CADC_REGISTRY
    if body.get("registry") is not None:
        gkey = join(key, "registry")
        text = doc.string(body["registry"], gkey, "a URL or a file")
        registry = text if "://" in text else str(_existing_file(doc, text, gkey, "fix the path"))
        if "://" in text:
            registry = doc.url(text, gkey, CADC_REGISTRY)
    token_file = certificate = None
    if body.get("token_file") is not None:
        token_file = _existing_file(
            doc, body["token_file"], join(key, "token_file"), "write the bearer token into it"
        )
    if body.get("certificate") is not None:
        certificate = _existing_file(
            doc,
            body["certificate"],
            join(key, "certificate"),
            "point it at a proxy certificate (certificate and key in one PEM)",
        )
    if token_file is not None and certificate is not None:
        doc.fail(key, "has both token_file: and certificate: keep one")
    vospace = VOSpaceConfig(
        container=container,
        capabilities_url=caps,
        resource_id=resource_id,
        registry=registry,
        token_file=token_file,
        certificate=certificate,
    )
    if "verify" in body:
        vospace = replace(vospace, verify=doc.verify(body["verify"], join(key, "verify")))
    if "timeout" in body:
        vospace = replace(
            vospace,
            timeout=doc.duration(body["timeout"], join(key, "timeout"), within=TIMEOUT_RANGE),
        )
    return StoreConfig(name=name, type="vospace", max_transfers=max_transfers, vospace=vospace)


def _parse_store(doc: Document, name: str, raw: object, key: str) -> StoreConfig:
    body = doc.mapping(raw, key, "write `type: directory` and `path: /srv/imagesync`")
    # the accepted types are the kinds of site imagesync can build (the sites' registry)
    built = tuple(t for t in STORE_TYPES if t in store_kinds())
    if "type" not in body:
        doc.fail(join(key, "type"), f"missing: add it (one of: {', '.join(built)})")
    if body["type"] in STORE_TYPES and body["type"] not in built:
        doc.fail(
            join(key, "type"),
            f"{body['type']!r} stores are not built in this version of "
            f"imagesync: use one of: {', '.join(built)}",
        )
    kind = doc.choice(body["type"], join(key, "type"), built)
    max_transfers = 2
    if "max_transfers" in body:
        max_transfers = _max_transfers(doc, body["max_transfers"], join(key, "max_transfers"))
    compress = _compress(doc, body.get("compress"), join(key, "compress"))
    if kind != "directory":
        return replace(_parse_vospace(doc, name, body, key, max_transfers), compress=compress)
    doc.known_keys(body, key, DIRECTORY_KEYS)
    pkey = join(key, "path")
    if "path" not in body:
        doc.fail(pkey, "missing: add it (an absolute directory path, like /srv/imagesync)")
    path = Path(doc.string(body["path"], pkey, "an absolute path")).expanduser()
    if not path.is_absolute():
        doc.fail(pkey, f"{str(path)!r} is relative: write an absolute path, like /srv/imagesync")
    return StoreConfig(
        name=name, type="directory", path=path, max_transfers=max_transfers, compress=compress
    )


def _compress(doc: Document, value: object, key: str) -> Literal["zstd"] | None:
    """``compress: zstd`` (or ``none``, or absent: stored as they are)."""
    if value is None or value is False:
        return None
    choice = doc.choice(value, key, (*COMPRESSIONS, "none"))
    return "zstd" if choice == "zstd" else None


def _parse_sites(
    doc: Document, top: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, StoreConfig], list[_CloudSpec]]:
    """(clouds as written, stores, cloud specs): names checked, unique across both kinds."""
    site_hint = "NAME: {...} entries"
    raw_stores = doc.mapping(top.get("stores"), "stores", f"write store {site_hint}")
    raw_clouds = doc.mapping(top.get("clouds"), "clouds", f"write cloud {site_hint}")
    if not raw_clouds and not raw_stores:
        doc.fail(
            "clouds", "no sites: add at least one cloud under clouds: (or one store under stores:)"
        )
    for name in raw_clouds:
        doc.site_name(name, join("clouds", name))
    for name in raw_stores:
        doc.site_name(name, join("stores", name))
        if name in raw_clouds:
            doc.fail(
                join("stores", name),
                f"{name!r} is also a cloud (clouds.{name}): site "
                "names must be unique across clouds and stores: rename one",
            )
    stores = {n: _parse_store(doc, n, v, join("stores", n)) for n, v in raw_stores.items()}
    specs = [_parse_cloud(doc, n, v, join("clouds", n)) for n, v in raw_clouds.items()]
    return raw_clouds, stores, specs


# --------------------------------------------------------------------------- top level


def _max_transfers(doc: Document, value: object, key: str) -> int:
    low, high = MAX_TRANSFERS_RANGE
    return doc.integer(value, key, low, maximum=high)


def _listen(doc: Document, value: object, key: str) -> str:
    hint = "write host:port like 127.0.0.1:9780 (or [::1]:9780)"
    if not isinstance(value, str):
        doc.fail(key, f"is {describe(value)}; {hint}")
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", value.strip())
    if not m:
        doc.fail(key, f"{value!r} is not host:port: {hint}")
    if not 1 <= int(m.group(2)) <= 65535:
        doc.fail(key, f"port {m.group(2)} is out of range: use 1-65535")
    return value.strip()


def _top_document(doc: Document, data: object) -> dict[str, Any]:
    """The top-level mapping, its keys checked (``x-…`` keys are the writer's own)."""
    if data is None:
        doc.fail(
            None,
            "the file is empty: it needs at least `clouds:` or `stores:` "
            "(`imagesync config example` prints an annotated one)",
        )
    if not isinstance(data, Mapping):
        doc.fail(
            None,
            f"the top level is {describe(data)}; it must be a mapping of keys like "
            "clouds:, stores:, images:",
        )
    # top-level keys starting with "x-" are the writer's own (YAML anchors to merge with <<)
    top = {k: v for k, v in doc.mapping(data, "", "").items() if not k.startswith("x-")}
    doc.known_keys(top, "", TOP_KEYS, _MISPLACED)
    return top


class _Settings(TypedDict):
    """The top-level scalar settings: keyword arguments of :class:`Config`."""

    state_dir: Path
    poll_interval: float
    check_max_age: float
    full_list_interval: float
    empty_listing_passes: int
    max_transfers: int
    transfer_retries: int
    metrics_listen: str | None
    metrics_listen_public: bool
    log_format: Literal["auto", "json", "console"]
    log_level: str


def _settings(doc: Document, top: Mapping[str, Any]) -> _Settings:
    """The top-level scalar settings, each default unless the file sets it."""
    out: _Settings = {
        "state_dir": DEFAULT_STATE_DIR,
        "poll_interval": DEFAULT_POLL_INTERVAL,
        "check_max_age": 600.0,
        "full_list_interval": DEFAULT_FULL_LIST_INTERVAL,
        "empty_listing_passes": DEFAULT_EMPTY_LISTING_PASSES,
        "max_transfers": 4,
        "transfer_retries": 3,
        "metrics_listen": None,
        "metrics_listen_public": False,
        "log_format": "auto",
        "log_level": "info",
    }
    if "state_dir" in top:
        out["state_dir"] = doc.path(top["state_dir"], "state_dir")
    if "poll_interval" in top:
        out["poll_interval"] = doc.duration(
            top["poll_interval"], "poll_interval", within=POLL_INTERVAL_RANGE
        )
    if "check_max_age" in top:
        out["check_max_age"] = doc.duration(
            top["check_max_age"], "check_max_age", allow_zero=True, within=CHECK_MAX_AGE_RANGE
        )
    if "full_list_interval" in top:
        out["full_list_interval"] = _full_list_interval(doc, top["full_list_interval"])
    if "empty_listing_passes" in top:
        out["empty_listing_passes"] = doc.integer(
            top["empty_listing_passes"], "empty_listing_passes", 1
        )
        if out["empty_listing_passes"] > EMPTY_LISTING_PASSES_MAX:
            doc.fail(
                "empty_listing_passes",
                f"is {out['empty_listing_passes']}: at most {EMPTY_LISTING_PASSES_MAX} "
                "(1 believes an empty listing at once)",
            )
    if "max_transfers" in top:
        out["max_transfers"] = _max_transfers(doc, top["max_transfers"], "max_transfers")
    if "transfer_retries" in top:
        low, high = TRANSFER_RETRIES_RANGE
        out["transfer_retries"] = doc.integer(
            top["transfer_retries"], "transfer_retries", low, maximum=high
        )
    if "metrics_listen_public" in top:
        if not isinstance(top["metrics_listen_public"], bool):
            doc.fail(
                "metrics_listen_public",
                f"is {describe(top['metrics_listen_public'])}; write true or false",
            )
        out["metrics_listen_public"] = top["metrics_listen_public"]
    if top.get("metrics_listen") is not None:
        listen = out["metrics_listen"] = _listen(doc, top["metrics_listen"], "metrics_listen")
        if not out["metrics_listen_public"] and not listens_on_loopback(listen):
            doc.fail(
                "metrics_listen",
                f"{listen!r} is reachable from other hosts, and the metrics "
                "name every image and site: listen on 127.0.0.1 or [::1] (scrape through a "
                "proxy or tunnel), or add `metrics_listen_public: true` if that is meant",
            )
    if "log_format" in top:
        out["log_format"] = cast(
            Literal["auto", "json", "console"],
            doc.choice(top["log_format"], "log_format", LOG_FORMATS),
        )
    if "log_level" in top:
        out["log_level"] = doc.choice(top["log_level"], "log_level", LOG_LEVELS)
    return out


def _full_list_interval(doc: Document, value: object) -> float:
    """How often a site is listed fully: bounded, since too short lists thousands of images
    every pass and too long leaves deletions by others unseen (``check`` then confirms)."""
    seconds = doc.duration(value, "full_list_interval")
    low, high = FULL_LIST_INTERVAL_BOUNDS
    if not low <= seconds <= high:
        doc.fail(
            "full_list_interval",
            f"is {format_duration(seconds)}: give between {format_duration(low)} "
            f"and {format_duration(high)}",
        )
    return seconds


def _clouds_yaml(doc: Document, top: Mapping[str, Any], *, must_exist: bool) -> Path | None:
    if top.get("clouds_yaml") is None:
        return None
    clouds_yaml = doc.path(top["clouds_yaml"], "clouds_yaml")
    # Not looked at when it will not be read: `check` answering from state must not need
    # the secrets, nor even see their file (a scheduler account may not).
    if must_exist and not clouds_yaml.is_file():
        doc.fail(
            "clouds_yaml",
            f"{clouds_yaml} is not a file: fix the path, or remove "
            "clouds_yaml to use the standard clouds.yaml search path",
        )
    return clouds_yaml


def load_config(
    path: Path | None = None, env: Mapping[str, str] = os.environ, *, resolve_clouds: bool = True
) -> Config:
    """Read, validate and resolve the configuration; raise ConfigError on the first mistake.

    ``resolve_clouds=False`` skips reading clouds.yaml (and importing openstacksdk, ~0.5 s):
    clouds named by ``cloud:`` then have empty ``auth``. Only for callers that will not talk
    to a cloud, such as ``check`` answering from recorded state; they reload to go further.
    """
    file = resolve_config_path(path, env)
    data, doc = read_document(file, env)
    top = _top_document(doc, data)
    settings = _settings(doc, top)
    clouds_yaml = _clouds_yaml(doc, top, must_exist=resolve_clouds)
    raw_clouds, stores, specs = _parse_sites(doc, top)
    rules = parse_rules(doc, top.get("images"), raw_clouds, stores)
    if resolve_clouds:
        clouds = _resolve_clouds(doc, specs, clouds_yaml)
    else:
        clouds = {
            sp.name: CloudConfig(name=sp.name, auth={}, auth_type="unresolved", cloud=sp.entry)
            for sp in specs
        }
    coordination = parse_coordination(doc, top.get("coordination"))
    return Config(
        path=file.absolute(),
        clouds=clouds,
        stores=stores,
        images=rules,
        coordination=coordination,
        **settings,
    )
