"""The ``clouds:`` and ``stores:`` sections of a configuration → checked sites.

A cloud is written inline (``auth:`` with its credentials) or as ``cloud: ENTRY`` of a
clouds.yaml, resolved through openstacksdk's loader (:mod:`imagesync.sites.openstack_auth`,
the only place that imports it); a store is a directory or a VOSpace container, of a kind
imagesync can build (:func:`imagesync.sites.store_kinds`). Secrets read here are registered
with :mod:`imagesync.secrets` so that logs mask them. :mod:`imagesync.config.load` calls
:func:`parse_sites`, then :func:`resolve_cloud_entries` when the caller will talk to the clouds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

from imagesync.config.document import Document, index, join, suggest
from imagesync.config.types import (
    CADC_REGISTRY,
    CLOUD_KEYS,
    COMPRESSIONS,
    DIRECTORY_KEYS,
    INTERFACES,
    MAX_TRANSFERS_RANGE,
    STORE_TYPES,
    TIMEOUT_RANGE,
    VOSPACE_KEYS,
    CloudConfig,
    StoreConfig,
    VOSpaceConfig,
    describe,
)
from imagesync.secrets import is_secret_key, register_secret
from imagesync.sites import openstack_auth, store_kinds
from imagesync.sites.openstack_auth import CloudsYaml, OpenStackConfigError

_KEYSTONE_EXAMPLE = "https://keystone.example.org:5000/v3"
_VOSPACE_EXAMPLE = "https://ws-cadc.canfar.net/vault"


# --------------------------------------------------------------------------- clouds


@dataclass
class CloudSpec:
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
    server_side: bool = True


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


def _parse_cloud(doc: Document, name: str, raw: object, key: str) -> CloudSpec:
    hint = "write `cloud: ENTRY` (an entry of clouds.yaml) or `auth:` with auth_url and credentials"
    body = doc.mapping(raw, key, hint)
    doc.known_keys(body, key, CLOUD_KEYS)
    spec = CloudSpec(name=name, key=key)
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
        spec.max_transfers = parse_max_transfers(
            doc, body["max_transfers"], join(key, "max_transfers")
        )
    spec.trusted_owners = _owners(doc, body.get("trusted_owners"), join(key, "trusted_owners"))
    if "server_side" in body:
        if not isinstance(body["server_side"], bool):
            doc.fail(
                join(key, "server_side"),
                f"is {describe(body['server_side'])}; write true (let Glance fetch from the "
                "source itself when it can) or false (always relay the bytes)",
            )
        spec.server_side = body["server_side"]
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


def resolve_cloud_entries(
    doc: Document, specs: list[CloudSpec], clouds_yaml: Path | None
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
                server_side=spec.server_side,
            )
        else:
            assert found is not None
            out[spec.name] = _from_clouds_yaml(doc, spec, found)
    for cloud in out.values():
        for k, v in cloud.auth.items():
            if is_secret_key(k):
                register_secret(v)
    return out


def _from_clouds_yaml(doc: Document, spec: CloudSpec, clouds: CloudsYaml) -> CloudConfig:
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
        server_side=spec.server_side,
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
    caps, resource_id, registry = _vospace_service(doc, body, key)
    token_file, certificate = _vospace_credentials(doc, body, key)
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


def _vospace_service(
    doc: Document, body: Mapping[str, Any], key: str
) -> tuple[str | None, str | None, str]:
    """Where the VOSpace service is: (capabilities URL, resource ID, registry), the first
    two exclusive (neither: the container's authority is looked up in the registry)."""
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
    return caps, resource_id, registry


def _vospace_credentials(
    doc: Document, body: Mapping[str, Any], key: str
) -> tuple[Path | None, Path | None]:
    """(token_file, certificate): at most one of them (neither: anonymous)."""
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
    return token_file, certificate


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
        max_transfers = parse_max_transfers(doc, body["max_transfers"], join(key, "max_transfers"))
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


def parse_sites(
    doc: Document, top: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, StoreConfig], list[CloudSpec]]:
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


def parse_max_transfers(doc: Document, value: object, key: str) -> int:
    low, high = MAX_TRANSFERS_RANGE
    return doc.integer(value, key, low, maximum=high)
