"""The inventory's judgement of listings: a sudden drop to zero images of managed names is
suspect, not truth; deletions by others are noticed within ``full_list_interval``. Over
memory sites, with an injected clock (no wall-clock asserts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagesync.config.types import Config
from imagesync.engine import Engine
from imagesync.engine.inventory import Inventory
from imagesync.plan import Copy, plan
from imagesync.sites.memory import ChangeListingMemorySite, MemorySite, memory_site
from tests.unit.memconfig import memory_config


def make(
    tmp_path: Path, *, list_changes: bool = False, **settings: Any
) -> tuple[Engine, dict[str, MemorySite]]:
    sites = {n: memory_site(n, list_changes=list_changes) for n in ("c1", "c2")}
    config = memory_config(tmp_path, sites, poll_interval=300, **settings)
    return Engine(config, sites=sites), sites


def copies_to(engine: Engine, site: str) -> bool:
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    return any(site in c.targets for c in p.actions if isinstance(c, Copy))


def test_a_sudden_drop_to_zero_is_suspect_until_it_persists(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, empty_listing_passes=3)
    sites["c1"].add("img-a", b"a" * 10)
    sites["c1"].add("other", b"not managed")
    engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))  # c2 gets it
    assert engine.inventories()["c2"].ok
    # c2's credentials now reach another (empty) project: its listing says "nothing"
    for image_id in list(sites["c2"].images):
        sites["c2"].delete(image_id)
    for _ in range(2):  # not believed: c2 is failed, so nothing is copied to it again
        inventories = engine.inventories()
        assert "suspect" in (inventories["c2"].error or "")
        p = plan(engine.rules, inventories, engine.site_names)
        assert not [c for c in p.actions if isinstance(c, Copy)]
    # the third empty listing in a row is believed: the image is copied back
    assert copies_to(engine, "c2")


def test_a_site_that_never_listed_managed_images_may_be_empty(tmp_path: Path) -> None:
    engine, sites = make(tmp_path)
    sites["c1"].add("other", b"not managed")
    assert engine.inventories()["c1"].ok
    for image_id in list(sites["c1"].images):
        sites["c1"].delete(image_id)
    assert engine.inventories()["c1"].ok  # it never held images of managed names


def test_empty_listing_passes_1_believes_at_once(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, empty_listing_passes=1)
    sites["c1"].add("img-a", b"a")
    assert engine.inventories()["c1"].ok
    for image_id in list(sites["c1"].images):
        sites["c1"].delete(image_id)
    assert engine.inventories()["c1"].ok


def test_deletions_by_others_are_noticed_within_full_list_interval(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, list_changes=True)
    now = [0.0]
    inventory = Inventory(engine.pool, full_list_every=600.0, clock=lambda: now[0])
    inventory.pass_interval = 300.0  # the daemon's poll_interval
    site = sites["c1"]
    assert isinstance(site, ChangeListingMemorySite)
    site.add("img-a", b"a")
    site.add("img-b", b"b")
    inventory.all(["c1"], incremental=True)  # t=0: full listing
    gone = next(i for i, st in site.images.items() if st.rec.name == "img-a")
    site.delete(gone)  # just after: someone else deletes it (not a change Glance lists)
    seen_at = None
    # the daemon's passes, every poll_interval, each starting a few ms early or late
    for t in (299.99, 599.99, 900.01):
        now[0] = t
        names = {r.name for r in inventory.all(["c1"], incremental=True)["c1"].images}
        if "img-a" not in names:
            seen_at = t
            break
    assert seen_at is not None and seen_at <= 600.0
    assert site.changed_calls == 1  # the pass at 300 was incremental: no full listing early


def test_full_list_interval_and_empty_listing_passes_reach_the_inventory(tmp_path: Path) -> None:
    engine, _ = make(tmp_path, full_list_interval=120.0, empty_listing_passes=5)
    room = engine.inventory_room
    assert (room.full_list_every, room.pass_interval, room.empty_passes) == (120.0, 300.0, 5)


def _load(tmp_path: Path, extra: str) -> Config:
    from imagesync.config.load import load_config

    path = tmp_path / "imagesync.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n{extra}"
        "clouds:\n  a: {auth: {auth_url: 'https://k.example.org/v3', username: u, "
        "password: p, project_name: x}}\n"
    )
    return load_config(path)


def test_full_list_interval_is_read_and_bounded(tmp_path: Path) -> None:
    import pytest

    from imagesync.errors import ConfigError

    config = _load(tmp_path, "")
    assert (config.full_list_interval, config.empty_listing_passes) == (600.0, 3)
    config = _load(tmp_path, "full_list_interval: 2m\nempty_listing_passes: 1\n")
    assert (config.full_list_interval, config.empty_listing_passes) == (120.0, 1)
    for bad in ("full_list_interval: 1s", "full_list_interval: 30d", "empty_listing_passes: 0"):
        with pytest.raises(ConfigError, match=bad.split(":")[0]):
            _load(tmp_path, bad + "\n")
