"""Shared fixtures: the lab (real Keystone + Glance clouds on loopback), clients, unique names.

``lab`` starts a 3-cloud lab once per session in a temporary directory and stops it at the
end. To reuse a lab that is already running (fast edit-test cycles)::

    imagesync lab up --clouds 3 --dir /tmp/testlab
    IMAGESYNC_TEST_LAB_DIR=/tmp/testlab pytest tests/integration

(the lab is then left running). ``nova_lab`` is the same lab with Nova on lab1, started only
when a test asks for it (``imagesync lab up --nova`` beforehand saves that start). If the lab
cannot start, the tests using it fail with the reason: integration tests never skip silently.
Everything under tests/integration is marked ``integration`` (``pytest -m "not integration"``
runs the fast tests only).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagesync.errors import LabError
from imagesync.lab import LabInfo, LabVOSpace

LAB_CLOUDS = 3
REUSE_ENV = "IMAGESYNC_TEST_LAB_DIR"
INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabInfo]:
    """A running lab of (at least) 3 clouds: lab1, lab2, lab3."""
    from imagesync import lab as lab_mod
    from imagesync.sites import store_kinds

    reuse = os.environ.get(REUSE_ENV, "").strip()
    directory = Path(reuse) if reuse else tmp_path_factory.mktemp("lab")
    try:
        info = lab_mod.up(  # a bigger lab stays bigger
            clouds=LAB_CLOUDS,
            directory=directory,
            # as `imagesync lab up` does: the VOSpace service is the central store once
            # imagesync can build a VOSpace site
            vospace_store="vospace" in store_kinds(),
        )
    except LabError as exc:
        pytest.fail(f"the lab could not start: {exc}", pytrace=False)
    try:
        yield info
    finally:
        if not reuse:
            lab_mod.down(directory)


@pytest.fixture
def lab_vospace(lab: LabInfo) -> Iterator[LabVOSpace]:
    """The lab's VOSpace service, with no fault rules before and after the test."""
    from imagesync.lab.vospace import clear_faults

    if lab.vospace is None:
        pytest.fail("the lab has no VOSpace service", pytrace=False)
    clear_faults(lab.vospace.directory)
    yield lab.vospace
    clear_faults(lab.vospace.directory)


@pytest.fixture(scope="session")
def nova_lab(lab: LabInfo) -> LabInfo:
    """The lab, with Placement + Nova on lab1 (started on first use: ≈320 MB, ≈15 s cold,
    a few seconds warm; only the tests that need compute pay for it)."""
    from imagesync import lab as lab_mod

    if lab.cloud("lab1").compute_url is not None:
        return lab
    try:
        return lab_mod.up(clouds=len(lab.clouds), directory=lab.directory, nova_clouds=1)
    except LabError as exc:
        pytest.fail(f"Nova could not start in the lab: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def lab_session() -> Callable[..., Any]:
    """``lab_session(lab, "lab1", admin=False)``: a keystoneauth1 Session (imagesync user)."""
    from imagesync.lab import session

    return session


@pytest.fixture(scope="session")
def glance_client() -> Callable[..., Any]:
    """``glance_client(lab, "lab1", admin=False)``: a glanceclient v2 Client (imagesync user)."""
    from imagesync.lab import glance_client

    return glance_client


@pytest.fixture
def unique_name() -> str:
    """A name no other test uses: tests share the lab's clouds and keep apart by names."""
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _isolated_logging() -> None:
    """Every test starts from the same logging: all levels, JSON, to stderr (never stdout,
    where commands print their answers). A test that configures logging cannot leak it."""
    from imagesync.logs import setup_logging

    setup_logging(fmt="json", level="debug")
