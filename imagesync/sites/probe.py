"""Can imagesync reach every site? ``imagesync config check --connect``.

Authenticates to every cloud with keystoneauth1 and finds its Glance endpoint, and checks
that directory stores are writable. Every failure becomes one secret-free sentence.
"""

from __future__ import annotations

import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagesync.config.types import CloudConfig, Config, StoreConfig
from imagesync.logs import captured_library_logs, redact


def _oneline(text: object) -> str:
    """A library's message as one secret-free line."""
    return redact(" ".join(str(text).split())).rstrip(".")[:300]


def _cloud_auth(cloud: CloudConfig) -> Any:
    from keystoneauth1 import loading

    loader: Any = loading.get_plugin_loader(cloud.auth_type)
    return loader.load_from_options(**dict(cloud.auth))


def _explain(exc: BaseException, cloud: CloudConfig) -> str:
    """A short, secret-free sentence for a keystoneauth failure."""
    from keystoneauth1 import exceptions as ks

    url = str(cloud.auth.get("auth_url", "?"))
    if isinstance(exc, ks.Unauthorized):
        return "authentication refused (401): check the username/password or application " \
            f"credential (at {url})"
    if isinstance(exc, ks.Forbidden):
        return f"forbidden (403) at {url}: the user may not use this project"
    if isinstance(exc, ks.SSLError):
        return f"TLS verification failed for {url}: set verify: to the cloud's CA bundle"
    if isinstance(exc, ks.ConnectTimeout):
        return f"timed out connecting to {url}"
    if isinstance(exc, ks.ConnectionError):
        return f"cannot connect to {url}"
    if isinstance(exc, ks.EmptyCatalog):
        return f"the token from {url} has no service catalog: scope it to a project"
    if isinstance(exc, ks.EndpointNotFound):
        return f"no image endpoint in the catalog for region {cloud.region_name or '(any)'} " \
            f"(interface {cloud.interface})"
    if isinstance(exc, ks.DiscoveryFailure):
        return f"no Keystone API found at {url}: check auth_url (it usually ends in /v3)"
    if isinstance(exc, ks.NotFound):
        return f"{url} answered 404: check auth_url"
    if isinstance(exc, ks.HttpError):
        return f"HTTP {exc.http_status} from {url}"
    if isinstance(exc, ks.MissingRequiredOptions | ks.OptionError):
        return f"incomplete credentials: {_oneline(exc)}"
    return f"{type(exc).__name__}: {_oneline(exc)}"[:300]


def _check_cloud(cloud: CloudConfig) -> tuple[str, bool, str]:
    from keystoneauth1 import session as ks_session

    try:
        plugin = _cloud_auth(cloud)
        sess = ks_session.Session(auth=plugin, verify=cloud.verify, timeout=cloud.timeout)
        sess.get_token()
        endpoint = cloud.endpoint_override or sess.get_endpoint(
            service_type="image", interface=cloud.interface, region_name=cloud.region_name)
    except Exception as exc:  # every failure becomes one line of the report
        return cloud.name, False, _explain(exc, cloud)
    if not endpoint:
        return cloud.name, False, (f"no image endpoint in the catalog for region "
                                   f"{cloud.region_name or '(any)'} (interface {cloud.interface})")
    return cloud.name, True, redact(f"authenticated at {cloud.auth.get('auth_url')}; "
                                    f"glance at {endpoint}")


def _check_store(store: StoreConfig) -> tuple[str, bool, str]:
    if store.type != "directory" or store.path is None:
        return store.name, True, f"not checked: no connection check for {store.type} stores yet"
    path = store.path
    if not path.exists():
        return store.name, False, f"{path} does not exist: create it (mkdir -p {path})"
    if not path.is_dir():
        return store.name, False, f"{path} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".imagesync-check-"):
            pass
    except OSError as exc:
        return store.name, False, f"{path} is not writable: {exc.strerror or exc}"
    return store.name, True, f"writable directory {path}"


def check_connections(config: Config) -> list[tuple[str, bool, str]]:
    """(site, ok, detail) for every cloud (authenticate, find Glance) and store, in config order.

    Details never contain a secret.
    """
    results: list[tuple[str, bool, str]] = []
    with warnings.catch_warnings(), captured_library_logs():
        warnings.simplefilter("ignore")
        clouds = list(config.clouds.values())
        if clouds:
            with ThreadPoolExecutor(max_workers=min(8, len(clouds))) as pool:
                results.extend(pool.map(_check_cloud, clouds))
    results.extend(_check_store(s) for s in config.stores.values())
    return [(name, ok, redact(detail)) for name, ok, detail in results]
