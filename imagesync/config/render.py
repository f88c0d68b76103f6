"""``imagesync config show``: the effective configuration as YAML, every secret masked.

Clouds appear resolved (clouds.yaml entries merged), durations in their shortest form, rules
with ``clouds: all`` expanded; the output reads back through ``load_config`` to the same
:class:`~imagesync.config.types.Config` once the masked secrets are filled in again.
"""

from __future__ import annotations

from typing import Any

import yaml

from imagesync.config.types import Config, VOSpaceConfig, format_duration
from imagesync.secrets import mask


class _Dumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    # short lists of names on one line ([a, b]), as a person writes them
    flow = all(isinstance(x, str | int | float) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _clouds(config: Config) -> dict[str, Any]:
    clouds: dict[str, Any] = {}
    for c in config.clouds.values():
        entry: dict[str, Any] = {"cloud": c.cloud} if c.cloud else {}
        entry.update(
            auth_type=c.auth_type,
            auth=dict(c.auth),
            region_name=c.region_name,
            interface=c.interface,
            verify=c.verify,
            timeout=format_duration(c.timeout),
            max_transfers=c.max_transfers,
        )
        if c.endpoint_override:
            entry["endpoint_override"] = c.endpoint_override
        # always shown: [] says that only imagesync's own project's images count
        entry["trusted_owners"] = list(c.trusted_owners)
        if not c.server_side:
            entry["server_side"] = False
        if c.disk_formats:
            entry["disk_formats"] = list(c.disk_formats)
        clouds[c.name] = entry
    return clouds


def _vospace(v: VOSpaceConfig) -> dict[str, Any]:
    body: dict[str, Any] = {"container": v.container}
    if v.capabilities_url is not None:
        body["url"] = v.capabilities_url
    else:  # the resource ID (the container's unless given) is looked up in the registry
        if v.resource_id is not None:
            body["resource_id"] = v.resource_id
        body["registry"] = v.registry
    # the token's file is named, never its contents
    for key, path in (("token_file", v.token_file), ("certificate", v.certificate)):
        if path is not None:
            body[key] = str(path)
    body.update(verify=v.verify, timeout=format_duration(v.timeout))
    return body


def _stores(config: Config) -> dict[str, Any]:
    stores: dict[str, Any] = {}
    for s in config.stores.values():
        body: dict[str, Any] = {"type": s.type}
        if s.path is not None:
            body["path"] = str(s.path)
        if s.vospace is not None:
            body.update(_vospace(s.vospace))
        body["max_transfers"] = s.max_transfers
        body["compress"] = s.compress or "none"
        stores[s.name] = body
    return stores


def _conversion(config: Config) -> dict[str, Any]:
    conv = config.conversion
    body: dict[str, Any] = {}
    if conv.scratch_dir is not None:  # unset follows state_dir
        body["scratch_dir"] = str(conv.scratch_dir)
    body["scratch_max_size"] = conv.scratch_max_size
    return body


def render_config(config: Config) -> str:
    """The effective configuration as YAML: clouds resolved, durations normalised, every secret
    shown as ``********``."""
    data: dict[str, Any] = {
        "state_dir": str(config.state_dir),
        "poll_interval": format_duration(config.poll_interval),
        "max_transfers": config.max_transfers,
        "transfer_retries": config.transfer_retries,
        "check_max_age": format_duration(config.check_max_age),
        "full_list_interval": format_duration(config.full_list_interval),
        "empty_listing_passes": config.empty_listing_passes,
        "metrics_listen": config.metrics_listen,
        "metrics_listen_public": config.metrics_listen_public,
        "log_format": config.log_format,
        "log_level": config.log_level,
        "conversion": _conversion(config),
        "clouds": _clouds(config),
        "stores": _stores(config),
        "images": [
            {
                "name": r.pattern,
                "clouds": list(r.clouds),
                "stores": list(r.stores),
                "visibility": r.visibility,
                "min_copies": r.min_copies,
                "keep": r.keep,
                "retire": r.retire,
                "on_mismatch": r.on_mismatch,
            }
            for r in config.images
        ],
    }
    header = (
        f"# effective configuration of {config.path}\n" if config.path else ""
    ) + "# clouds.yaml entries resolved; secrets shown as ********\n"
    body_text = yaml.dump(
        mask(data), Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )
    return header + body_text
