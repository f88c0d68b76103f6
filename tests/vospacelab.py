"""The VOSpace service the tests drive, and the site configured for it (token in a file, as a
user would keep it).

Tests use the lab's service (``lab.vospace``; the ``lab_vospace`` fixture clears its fault
rules around each test). One kind of test needs a service of its own: one with a fault proxy
in front that every URL the service gives leads through (a byte flipped on the wire). The
service writes its base URL, fixed when it is prepared, into its capabilities and into every
transfer's endpoints, so a proxy put in front of the lab's service would see the first request
only: the site would then talk to the service directly. :func:`proxied_service` prepares a
service that believes the proxy's address is its own.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagesync.config.types import VOSpaceConfig
from imagesync.lab import LabVOSpace, procs
from imagesync.lab.vospace import service
from tests.faultproxy import VOSPACE_DATA, FaultProxy


def site_config(
    vo: LabVOSpace, *, capabilities_url: str | None = None, container: str | None = None
) -> VOSpaceConfig:
    """The VOSpace site's configuration for ``vo``: its container, its token file."""
    return VOSpaceConfig(
        container=container or vo.container,
        capabilities_url=capabilities_url or vo.capabilities_url,
        token_file=vo.token_file,
        timeout=30.0,
    )


@dataclass(frozen=True)
class ProxiedVOSpace:
    """A service of its own behind ``proxy``: ``vospace.url`` is the proxy's."""

    vospace: LabVOSpace
    proxy: FaultProxy


@contextmanager
def proxied_service(directory: Path) -> Iterator[ProxiedVOSpace]:
    """A lab VOSpace service on a free loopback port (token auth) with a fault proxy in front,
    the service told that the proxy's address is its own, until the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    token_file = directory / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    (port,) = procs.free_ports(1)
    proxy = FaultProxy(port, VOSPACE_DATA)
    try:
        config = service.prepare(directory / "service", proxy.port, token)
        pid = service.start(config, port)
        try:
            service.wait_ready(config, pid)
            yield ProxiedVOSpace(
                LabVOSpace(
                    url=config.base_url,
                    capabilities_url=f"{config.base_url}/capabilities",
                    resource_id=config.resource_id,
                    authority=config.authority,
                    container=f"vos://{config.authority}/{service.CONTAINER}",
                    token=token,
                    token_file=token_file,
                    directory=config.directory,
                ),
                proxy,
            )
        finally:
            procs.stop_groups({pid: str(service.pid_file(config.directory))})
    finally:
        proxy.close()
