"""The site pool: each site opened once, and two sites opened side by side (the inventory
lists every site concurrently; a Glance cloud's opening imports its client libraries, which
must not hold up a VOSpace store's capabilities and listing)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from imagesync.config.types import Config
from imagesync.engine import pool as pool_module
from imagesync.engine.pool import SitePool
from imagesync.sites.base import Site
from imagesync.sites.memory import MemorySite
from tests.unit.memconfig import memory_config

WAIT = 10.0  # seconds a thread waits for the other at most (a bound, not a measurement)


def test_two_sites_open_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_opening, b_opened = threading.Event(), threading.Event()
    saw_b: list[bool] = []

    def opening(config: Config, name: str) -> Site:
        if name == "a":  # a slow opening (imports): b must not wait for it
            a_opening.set()
            saw_b.append(b_opened.wait(WAIT))
        else:
            b_opened.set()
        return MemorySite(name)

    monkeypatch.setattr(pool_module, "open_site", opening)
    pool = SitePool(memory_config(tmp_path, ["a", "b"]))
    t = threading.Thread(target=pool.get, args=("a",))
    t.start()
    assert a_opening.wait(WAIT)
    assert pool.get("b").name == "b"
    t.join()
    assert saw_b == [True]
    assert pool.get("a").name == "a"


def test_a_site_is_opened_once_however_many_threads_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    release = threading.Event()

    def opening(config: Config, name: str) -> Site:
        opened.append(name)
        release.wait(WAIT)
        return MemorySite(name)

    monkeypatch.setattr(pool_module, "open_site", opening)
    pool = SitePool(memory_config(tmp_path, ["a"]))
    got: list[Site] = []
    threads = [threading.Thread(target=lambda: got.append(pool.get("a"))) for _ in range(4)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join()
    assert opened == ["a"] and len(got) == 4 and all(s is got[0] for s in got)
