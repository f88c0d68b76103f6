"""OpenStack authentication knowledge for the config loader: keystoneauth plugins, clouds.yaml.

What the configuration needs from keystoneauth1 and openstacksdk, kept here (the only layer
that may import OpenStack libraries) so that :mod:`imagesync.config` stays free of them:

- :data:`KNOWN_AUTH_OPTIONS` and :func:`plugin_options`: the option names of a keystoneauth
  auth plugin (a static table for the common ones, keystoneauth's loader for the rest);
- :func:`credential_problem`: the first credential a plugin still lacks;
- :func:`read_clouds_yaml` and :func:`cloud_entry`: ``cloud: ENTRY`` resolved through
  openstacksdk's own loader, so the usual search path, ``$OS_CLIENT_CONFIG_FILE`` and
  ``secure.yaml`` work as for the ``openstack`` command.

keystoneauth1 and openstacksdk are imported inside the functions that need them, never when
this module loads: ``imagesync check`` answers from recorded state without paying their import
(0.1-0.5 s). Failures come back as :class:`OpenStackConfigError` or :class:`UnknownAuthType`;
the config loader turns them into ``FILE:LINE: KEY:`` messages.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesync.secrets import redact

#: what openstacksdk's config loader logs through; kept out of the output while it runs
SDK_LOGGERS = ("openstack", "stevedore", "keystoneauth")
PASSWORD_PLUGINS = ("password", "v3password", "v2password")
APPCRED_PLUGINS = ("v3applicationcredential",)
TOKEN_PLUGINS = ("token", "v3token", "v2token")

_SCOPE = (
    "auth_url",
    "system_scope",
    "domain_id",
    "domain_name",
    "project_id",
    "project_name",
    "project_domain_id",
    "project_domain_name",
    "trust_id",
)
_USER = ("user_id", "username", "user_domain_id", "user_domain_name")
#: keystoneauth's options for the common auth types, so that loading a configuration does not
#: import keystoneauth (0.1-0.2 s, which `imagesync check` pays on every boot). A unit test
#: holds this table to keystoneauth's own ``get_options()``.
KNOWN_AUTH_OPTIONS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "password": (
        (*_SCOPE, "default_domain_id", "default_domain_name", *_USER, "password"),
        ("auth_url",),
    ),
    "v3password": ((*_SCOPE, *_USER, "password"), ("auth_url",)),
    "v3applicationcredential": (
        (
            *_SCOPE,
            *_USER,
            "application_credential_secret",
            "application_credential_id",
            "application_credential_name",
        ),
        ("auth_url", "application_credential_secret"),
    ),
    "token": ((*_SCOPE, "default_domain_id", "default_domain_name", "token"), ("auth_url",)),
    "v3token": ((*_SCOPE, "token"), ("auth_url",)),
}


class UnknownAuthType(Exception):
    """keystoneauth has no plugin of that name; ``known`` lists the ones it has, sorted."""

    def __init__(self, auth_type: str, known: list[str]) -> None:
        super().__init__(auth_type)
        self.auth_type = auth_type
        self.known = known


class OpenStackConfigError(Exception):
    """openstacksdk or keystoneauth refused a clouds.yaml file or entry; the message is one
    secret-free line without a closing period."""


def oneline(text: object) -> str:
    """A library's message as one secret-free line, without a closing period."""
    return redact(" ".join(str(text).split())).rstrip(".")


def plugin_options(auth_type: str) -> tuple[list[str], list[str]]:
    """(option names, required ones) of a keystoneauth plugin; UnknownAuthType if none."""
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
        raise UnknownAuthType(auth_type, sorted(loading.get_available_plugin_names())) from None
    options = loader.get_options()
    return [o.dest for o in options], [o.dest for o in options if o.required]


NO_CREDENTIALS = (
    "no credentials: add username, password and project_name (a password login), "
    "or application_credential_id and application_credential_secret (an "
    "application credential)"
)


def _appcred_problem(missing: Any) -> tuple[str, str] | None:
    if missing(
        "application_credential_id", "application_credential_name", "application_credential_secret"
    ):
        return "", NO_CREDENTIALS
    if missing("application_credential_secret"):
        return "application_credential_secret", "missing: add it"
    if missing("application_credential_id", "application_credential_name"):
        return (
            "application_credential_id",
            "missing: add it (or application_credential_name with username)",
        )
    if missing("application_credential_id") and missing("username", "user_id"):
        return (
            "username",
            "missing: an application credential given by name needs the "
            "username (or user_id) of its owner: add it, or use application_credential_id",
        )
    return None  # an application credential carries its own project


def credential_problem(
    auth_type: str, auth: Mapping[str, Any], required: Iterable[str]
) -> tuple[str, str] | None:
    """(sub-key, message) for the first missing credential, or None when complete."""

    def missing(*names: str) -> bool:
        return not any(auth.get(n) for n in names)

    if auth_type in PASSWORD_PLUGINS:
        if missing("username", "user_id", "password"):
            return "", NO_CREDENTIALS
        if missing("username", "user_id"):
            return "username", "missing: add it (or user_id)"
        if missing("password"):
            return "password", "missing: add it"
    elif auth_type in APPCRED_PLUGINS:
        return _appcred_problem(missing)
    elif auth_type in TOKEN_PLUGINS and missing("token"):
        return "token", "missing: add it"
    for name in required:
        if missing(name):
            return name, "missing: add it"
    if auth_type in PASSWORD_PLUGINS + TOKEN_PLUGINS and missing("project_name", "project_id"):
        return "project_name", (
            "missing: add project_name (or project_id): imagesync needs a "
            "project-scoped token to reach Glance"
        )
    return None


# --------------------------------------------------------------------------- clouds.yaml


@dataclass(frozen=True)
class CloudsYaml:
    """openstacksdk's view of the clouds.yaml files, as read once for a configuration."""

    loader: Any  # openstack.config.loader.OpenStackConfig
    searched: str  # where it looked, for messages
    found: str | None  # the file it read, if any
    entries: list[str]  # the entries of that file
    skipped: str  # files it could not parse (it only logs those), described; or ""


@dataclass(frozen=True)
class CloudEntry:
    """One clouds.yaml entry resolved (region chosen, secure.yaml merged)."""

    auth: dict[str, Any]
    auth_type: str
    region_name: str | None
    interface: str
    verify: bool | str
    timeout: float  # api_timeout, or 60 s
    image_endpoint: str | None  # image_endpoint_override, if the entry sets one


def _clouds_yaml_files(
    clouds_yaml: Path | None, env: Mapping[str, str]
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


def read_clouds_yaml(clouds_yaml: Path | None, env: Mapping[str, str]) -> CloudsYaml:
    """Read ``clouds_yaml`` (or search the usual places); OpenStackConfigError if unusable."""
    from imagesync.logs import captured_library_logs

    with warnings.catch_warnings(), captured_library_logs(SDK_LOGGERS) as records:
        warnings.simplefilter("ignore")
        from openstack.config import loader as os_loader

        files, secure, searched = _clouds_yaml_files(clouds_yaml, env)
        try:
            osc = os_loader.OpenStackConfig(
                config_files=files, secure_files=secure, load_envvars=False
            )
        except Exception as exc:  # openstacksdk raises several kinds; all mean "bad file"
            raise OpenStackConfigError(oneline(exc)) from None
    # openstacksdk skips a clouds.yaml it cannot parse and only logs it: say so
    skipped = "; ".join(
        f"{r.args[0]} is not valid YAML or JSON ({oneline(r.args[1])})"
        if isinstance(r.args, tuple) and len(r.args) == 2
        else oneline(r.getMessage())
        for r in records
        if r.msg.startswith("Skipping config file")
    )
    found = osc.config_filename
    # with no file found, openstacksdk invents a "defaults" entry: not one of the user's
    entries = list(osc.cloud_config.get("clouds", {})) if found else []
    return CloudsYaml(loader=osc, searched=searched, found=found, entries=entries, skipped=skipped)


def cloud_entry(clouds: CloudsYaml, entry: str, region_name: str | None) -> CloudEntry:
    """The entry ``entry`` (one of ``clouds.entries``) for ``region_name`` (or its default)."""
    from imagesync.logs import captured_library_logs

    kwargs = {"region_name": region_name} if region_name else {}
    with warnings.catch_warnings(), captured_library_logs(SDK_LOGGERS):
        warnings.simplefilter("ignore")
        try:
            region = clouds.loader.get_one(cloud=entry, **kwargs)
        except Exception as exc:  # keystoneauth and openstacksdk errors: the entry is wrong
            raise OpenStackConfigError(oneline(exc)) from None
    cfg = region.config
    try:
        timeout = float(cfg.get("api_timeout") or 60.0)
    except (TypeError, ValueError):
        timeout = 60.0
    return CloudEntry(
        auth={k: v for k, v in dict(cfg.get("auth") or {}).items() if v not in (None, "")},
        auth_type=str(cfg.get("auth_type") or "password"),
        region_name=region.region_name or None,
        interface=str(cfg.get("interface") or "public"),
        verify=region.get_requests_verify_args()[0],
        timeout=timeout,
        image_endpoint=region.get_endpoint("image") or None,
    )
