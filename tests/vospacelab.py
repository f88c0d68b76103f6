"""Start the lab's VOSpace service (``imagesync.lab.vospace``) for the tests that need one,
and build the VOSpace site configured for it (token in a file, as a user would keep it).

Until ``imagesync lab up`` starts one beside the clouds, a test session starts its own in a
temporary directory with :func:`running_service` and stops it at the end.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagesync.config.types import VOSpaceConfig
from imagesync.lab import procs
from imagesync.lab.vospace import ServiceConfig, service
from tests.faultproxy import VOSPACE_DATA, FaultProxy


@dataclass(frozen=True)
class RunningVOSpace:
    """One running lab VOSpace service."""

    config: ServiceConfig
    port: int
    token_file: Path
    #: in front of the service when asked for: every URL the service gives goes through it
    proxy: FaultProxy | None = None

    @property
    def directory(self) -> Path:
        return self.config.directory

    @property
    def capabilities_url(self) -> str:
        return f"{self.config.base_url}/capabilities"

    def container(self, path: str = service.CONTAINER) -> str:
        return f"vos://{self.config.authority}/{path}"

    def site_config(
        self, *, capabilities_url: str | None = None, container: str | None = None
    ) -> VOSpaceConfig:
        return VOSpaceConfig(
            container=container or self.container(),
            capabilities_url=capabilities_url or self.capabilities_url,
            token_file=self.token_file,
            timeout=30.0,
        )


@contextmanager
def running_service(directory: Path, *, proxied: bool = False) -> Iterator[RunningVOSpace]:
    """A lab VOSpace service on a free loopback port, token auth, until the block ends.

    ``proxied``: a fault proxy in front of it, and the service told that the proxy's address
    is its own, so that its capabilities and transfer endpoints all lead through the proxy.
    """
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    token_file = directory / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    (port,) = procs.free_ports(1)
    proxy = FaultProxy(port, VOSPACE_DATA) if proxied else None
    config = service.prepare(directory / "service", proxy.port if proxy else port, token)
    pid = service.start(config, port)
    try:
        service.wait_ready(config, pid)
        yield RunningVOSpace(config, port, token_file, proxy)
    finally:
        if proxy is not None:
            proxy.close()
        procs.stop_groups({pid: str(service.pid_file(config.directory))})
