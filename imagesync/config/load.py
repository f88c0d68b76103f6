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
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

from imagesync.config.coordination import parse_coordination
from imagesync.config.document import Document, read_document
from imagesync.config.formats import parse_conversion, with_disk_formats
from imagesync.config.rules import parse_rules
from imagesync.config.sites import parse_max_transfers, parse_sites, resolve_cloud_entries
from imagesync.config.types import (
    CHECK_MAX_AGE_RANGE,
    CLOUD_KEYS,
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_EMPTY_LISTING_PASSES,
    DEFAULT_FULL_LIST_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_STATE_DIR,
    EMPTY_LISTING_PASSES_MAX,
    FULL_LIST_INTERVAL_BOUNDS,
    LOG_FORMATS,
    LOG_LEVELS,
    POLL_INTERVAL_RANGE,
    RULE_KEYS,
    TOP_KEYS,
    TRANSFER_RETRIES_RANGE,
    CloudConfig,
    Config,
    describe,
    format_duration,
    listens_on_loopback,
)

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


def resolve_config_path(path: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    """The config file to read: ``-c PATH``, else ``$IMAGESYNC_CONFIG``, else the default."""
    if path is not None:
        return Path(path)
    from_env = env.get(CONFIG_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_CONFIG_PATH


# --------------------------------------------------------------------------- top level


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
        out["empty_listing_passes"] = _empty_listing_passes(doc, top["empty_listing_passes"])
    if "max_transfers" in top:
        out["max_transfers"] = parse_max_transfers(doc, top["max_transfers"], "max_transfers")
    if "transfer_retries" in top:
        low, high = TRANSFER_RETRIES_RANGE
        out["transfer_retries"] = doc.integer(
            top["transfer_retries"], "transfer_retries", low, maximum=high
        )
    out["metrics_listen"], out["metrics_listen_public"] = _metrics_listen(doc, top)
    if "log_format" in top:
        out["log_format"] = cast(
            Literal["auto", "json", "console"],
            doc.choice(top["log_format"], "log_format", LOG_FORMATS),
        )
    if "log_level" in top:
        out["log_level"] = doc.choice(top["log_level"], "log_level", LOG_LEVELS)
    return out


def _empty_listing_passes(doc: Document, value: object) -> int:
    passes = doc.integer(value, "empty_listing_passes", 1)
    if passes > EMPTY_LISTING_PASSES_MAX:
        doc.fail(
            "empty_listing_passes",
            f"is {passes}: at most {EMPTY_LISTING_PASSES_MAX} "
            "(1 believes an empty listing at once)",
        )
    return passes


def _metrics_listen(doc: Document, top: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(metrics_listen, metrics_listen_public): an address other hosts can reach only when
    the file says that is meant."""
    public = top.get("metrics_listen_public", False)
    if not isinstance(public, bool):
        doc.fail("metrics_listen_public", f"is {describe(public)}; write true or false")
    if top.get("metrics_listen") is None:
        return None, public
    listen = _listen(doc, top["metrics_listen"], "metrics_listen")
    if not public and not listens_on_loopback(listen):
        doc.fail(
            "metrics_listen",
            f"{listen!r} is reachable from other hosts, and the metrics "
            "name every image and site: listen on 127.0.0.1 or [::1] (scrape through a "
            "proxy or tunnel), or add `metrics_listen_public: true` if that is meant",
        )
    return listen, public


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
    raw_clouds, stores, specs = parse_sites(doc, top)
    rules = parse_rules(doc, top.get("images"), raw_clouds, stores)
    if resolve_clouds:
        clouds = resolve_cloud_entries(doc, specs, clouds_yaml)
    else:
        clouds = {
            sp.name: CloudConfig(name=sp.name, auth={}, auth_type="unresolved", cloud=sp.entry)
            for sp in specs
        }
    clouds = with_disk_formats(doc, raw_clouds, clouds)
    conversion = parse_conversion(doc, top.get("conversion"))
    coordination = parse_coordination(doc, top.get("coordination"))
    return Config(
        path=file.absolute(),
        clouds=clouds,
        stores=stores,
        images=rules,
        conversion=conversion,
        coordination=coordination,
        **settings,
    )
