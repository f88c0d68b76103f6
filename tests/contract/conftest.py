"""The sites every contract test runs against (rclone's fstests, APScheduler's parametrized
datastores): one ``harness`` fixture, parametrized over every kind of site.

``memory``, ``directory`` and ``vospace-stub`` (the VOSpace site over a small in-test service)
need nothing and run in the fast unit run; ``glance`` and ``vospace`` (the lab's VOSpace
service, ``lab.vospace``) are marked ``integration`` and ask for the session's ``lab`` only
when they run. A new kind of site adds one factory here.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagesync.sites.base import Site
from imagesync.sites.directory import DirectorySite
from imagesync.sites.memory import Faults, memory_site


@dataclass
class Harness:
    """A site to test, and what the tests need to know about its kind."""

    site: Site
    #: a site of the same kind whose I/O fails (an injected fault, a removed directory, a
    #: closed port)
    broken: Callable[[], Site]
    #: wait until the site's clock has moved past everything done so far (watermarks)
    settle: Callable[[], None]


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    def refuse(op: str, image_id: str | None) -> None:
        raise ConnectionResetError(f"{op}: connection reset by peer")

    return Harness(
        site=memory_site("memory", list_changes=True),
        broken=lambda: memory_site("broken", Faults(hook=refuse), list_changes=True),
        settle=lambda: time.sleep(0.001),
    )  # microsecond clock


def _directory(
    request: pytest.FixtureRequest, tmp_path: Path, compress: str | None = None
) -> Harness:
    def broken() -> Site:
        root = tmp_path / "gone"
        root.mkdir()
        site = DirectorySite("broken", root, compress=compress)
        shutil.rmtree(root)  # the store went away under a running site (unmounted, deleted)
        return site

    (tmp_path / "store").mkdir()
    return Harness(
        site=DirectorySite("store", tmp_path / "store", compress=compress),
        broken=broken,
        settle=lambda: None,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there now: connections are refused


def _glance(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    from imagesync.lab import LabInfo
    from imagesync.sites.glance import GlanceSite
    from tests.integration.labcfg import cloud_config

    lab: LabInfo = request.getfixturevalue("lab")
    closed = f"http://127.0.0.1:{_closed_port()}"
    return Harness(
        site=GlanceSite(cloud_config(lab, "lab3")),
        broken=lambda: GlanceSite(cloud_config(lab, "lab3", endpoint_override=closed)),
        settle=lambda: time.sleep(1.1),
    )  # Glance's times are whole seconds


def _vospace_stub(
    request: pytest.FixtureRequest, tmp_path: Path, compress: str | None = None
) -> Harness:
    """The VOSpace site over the in-test stub service (``tests/vospacestub.py``)."""
    from imagesync.config.types import VOSpaceConfig
    from imagesync.sites.vospace import VOSpaceSite
    from tests.vospacestub import StubNode, StubServer, StubVOSpace

    service = StubVOSpace()
    service.nodes["images"] = StubNode("ContainerNode", date="2024-01-01T00:00:00.000")
    server = StubServer(service)
    request.addfinalizer(server.close)

    def site(caps: str) -> Site:
        cfg = VOSpaceConfig(container="vos://example.org~store/images", capabilities_url=caps)
        return VOSpaceSite("store", cfg, sleep=lambda s: None, compress=compress)

    closed = f"http://127.0.0.1:{_closed_port()}/capabilities"
    return Harness(
        site=site(server.capabilities_url), broken=lambda: site(closed), settle=lambda: None
    )


def _vospace(
    request: pytest.FixtureRequest, tmp_path: Path, compress: str | None = None
) -> Harness:
    """The VOSpace site against the lab's VOSpace service (MoveNode, token from a file)."""
    from imagesync.lab import LabVOSpace
    from imagesync.sites.vospace import VOSpaceSite
    from tests.vospacelab import site_config

    vo: LabVOSpace = request.getfixturevalue("lab_vospace")
    closed = f"http://127.0.0.1:{_closed_port()}/capabilities"
    return Harness(
        site=VOSpaceSite("store", site_config(vo), compress=compress),
        broken=lambda: VOSpaceSite(
            "broken",
            site_config(vo, capabilities_url=closed),
            sleep=lambda s: None,
            compress=compress,
        ),
        settle=lambda: None,
    )


FACTORIES: dict[str, Callable[[pytest.FixtureRequest, Path], Harness]] = {
    "memory": _memory,
    "directory": _directory,
    "glance": _glance,
    "vospace-stub": _vospace_stub,
    "vospace": _vospace,
    # compress: zstd (sites/compress.py): the same contract over stores that compress
    "directory-zstd": lambda r, p: _directory(r, p, "zstd"),
    "vospace-stub-zstd": lambda r, p: _vospace_stub(r, p, "zstd"),
    "vospace-zstd": lambda r, p: _vospace(r, p, "zstd"),
}


@pytest.fixture(
    params=[
        "memory",
        "directory",
        "vospace-stub",
        "directory-zstd",
        "vospace-stub-zstd",
        pytest.param("glance", marks=pytest.mark.integration),
        pytest.param("vospace", marks=pytest.mark.integration),
        pytest.param("vospace-zstd", marks=pytest.mark.integration),
    ]
)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = FACTORIES[request.param](request, tmp_path)
    try:
        yield h
    finally:
        h.site.close()


@pytest.fixture
def site(harness: Harness) -> Site:
    return harness.site
