"""The OpenStack boundary that Glance and Nova share: a cloud's keystoneauth session and
adapters, and the classification of keystoneauth's, glanceclient's and requests' exceptions
into imagesync's hierarchy (``classify``), with the one secret-free sentence that says what to
fix when authenticating or finding a service fails (``explain``).
"""

from __future__ import annotations

from typing import Any

import requests
from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ksexc
from keystoneauth1 import loading as ks_loading
from keystoneauth1 import session as ks_session

from imagesync.config.types import CloudConfig
from imagesync.errors import AuthError, SiteError, TransientError
from imagesync.logs import redact
from imagesync.sites.httpstatus import status_error


def classify(exc: BaseException, site: str, what: str) -> SiteError:
    """Turn a client library's exception into imagesync's hierarchy."""
    if isinstance(exc, SiteError):
        return exc
    status: int | None = None
    response: Any = None
    if isinstance(exc, ksexc.HttpError):
        status, response = exc.http_status, exc.response
    elif type(exc).__module__.startswith("glanceclient"):
        # glanceclient.exc, matched by module so that it need not be imported to classify
        code = getattr(exc, "code", None)
        status = code if isinstance(code, int) else None
        if type(exc).__name__ in ("CommunicationError", "InvalidEndpoint"):
            return TransientError(f"{what}: connection failed: {type(exc).__name__}", site=site)
    text = f"{what}: {type(exc).__name__}"
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if detail:
        text += f": {detail}"
    if isinstance(exc, ksexc.EndpointNotFound):
        return SiteError(f"{what}: no image endpoint in the service catalog", site=site)
    if isinstance(exc, (ksexc.MissingAuthPlugin, ksexc.AuthPluginException)) and status is None:
        return AuthError(f"{what}: authentication is not configured: {detail}", site=site)
    if status is not None:
        refused = "check the credentials and roles"
        shown = f": {detail}" if detail else ""
        err = status_error(status, site, what, refused=refused, detail=shown, response=response)
        return err or SiteError(text, site=site)
    if isinstance(
        exc,
        (
            ksexc.ConnectionError,
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return TransientError(f"{what}: connection failed: {type(exc).__name__}", site=site)
    if isinstance(exc, ksexc.ClientException):
        return SiteError(text, site=site)
    return SiteError(text, site=site)


def _oneline(text: object) -> str:
    """A library's message as one secret-free line."""
    return redact(" ".join(str(text).split())).rstrip(".")[:300]


def _sentence(
    exc: BaseException, cfg: CloudConfig, url: str, what: str
) -> tuple[type[SiteError], str]:
    """The kind of error and the one secret-free sentence for a keystoneauth failure to
    authenticate at, or reach, ``url`` (``what`` names it in a 404's hint)."""
    if isinstance(exc, ksexc.Unauthorized):
        return AuthError, (
            "authentication refused (401): check the username/password or "
            f"application credential (at {url})"
        )
    if isinstance(exc, ksexc.Forbidden):
        return AuthError, f"forbidden (403) at {url}: the user may not use this project"
    if isinstance(exc, ksexc.SSLError):
        return SiteError, f"TLS verification failed for {url}: set verify: to the cloud's CA bundle"
    if isinstance(exc, ksexc.ConnectTimeout):
        return TransientError, f"timed out connecting to {url}"
    if isinstance(exc, ksexc.ConnectionError):
        return TransientError, f"cannot connect to {url}"
    if isinstance(exc, ksexc.EmptyCatalog):
        return SiteError, f"the token from {url} has no service catalog: scope it to a project"
    if isinstance(exc, ksexc.EndpointNotFound):
        return SiteError, no_endpoint(cfg)
    if isinstance(exc, ksexc.DiscoveryFailure):
        return SiteError, f"no Keystone API found at {url}: check auth_url (it usually ends in /v3)"
    if isinstance(exc, ksexc.NotFound):
        return SiteError, f"{url} answered 404: check {what}"
    if isinstance(exc, ksexc.HttpError):
        status = exc.http_status or 0
        transient = status >= 500 or status in (408, 429)
        return (TransientError if transient else SiteError), f"HTTP {status} from {url}"
    if isinstance(exc, ksexc.MissingRequiredOptions | ksexc.OptionError):
        return AuthError, f"incomplete credentials: {_oneline(exc)}"
    return SiteError, f"{type(exc).__name__}: {_oneline(exc)}"[:300]


def explain(
    exc: BaseException, cfg: CloudConfig, url: str | None = None, what: str = "auth_url"
) -> SiteError:
    """A failure to authenticate at the cloud's Keystone (or to reach ``url``, named ``what``)
    as a SiteError whose message says what to fix, without a secret."""
    if isinstance(exc, SiteError):
        return exc
    cls, message = _sentence(exc, cfg, url or str(cfg.auth.get("auth_url", "?")), what)
    return cls(message, site=cfg.name)


def no_endpoint(cfg: CloudConfig) -> str:
    return (
        f"no image endpoint in the catalog for region {cfg.region_name or '(any)'} "
        f"(interface {cfg.interface})"
    )


def make_session(cfg: CloudConfig) -> ks_session.Session:
    """A keystoneauth1 session for a cloud's resolved auth options."""
    try:
        loader: Any = ks_loading.get_plugin_loader(cfg.auth_type)
        auth = loader.load_from_options(**dict(cfg.auth))
    except ksexc.ClientException as exc:  # the options are wrong: an AuthError, whatever it is
        _, message = _sentence(exc, cfg, str(cfg.auth.get("auth_url", "?")), "auth_url")
        raise AuthError(message, site=cfg.name) from exc
    return ks_session.Session(auth=auth, verify=cfg.verify, timeout=cfg.timeout)


def make_adapter(
    session: ks_session.Session, cfg: CloudConfig, service_type: str, **extra: Any
) -> ks_adapter.Adapter:
    """An adapter for one of the cloud's services, on the cloud's interface and region."""
    return ks_adapter.Adapter(
        session,
        service_type=service_type,
        interface=cfg.interface,
        region_name=cfg.region_name,
        **extra,
    )
