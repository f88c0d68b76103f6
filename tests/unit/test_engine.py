"""Planner + executor + state together, over injected in-memory sites."""

from __future__ import annotations

import os
from pathlib import Path

from imagesync.engine import Engine
from imagesync.plan import plan
from imagesync.sites.memory import ChangeListingMemorySite, Faults, MemorySite, memory_site
from imagesync.state import State
from tests.unit.memconfig import memory_config


def make(
    tmp_path: Path, n: int = 3, *, list_changes: bool = False, **rule: object
) -> tuple[Engine, dict[str, MemorySite]]:
    sites = {f"c{i}": memory_site(f"c{i}", list_changes=list_changes) for i in range(1, n + 1)}
    config = memory_config(tmp_path, sites, rule=rule)
    engine = Engine(config, sites=sites)
    engine.config = config
    return engine, sites


def one_pass(engine: Engine, names: list[str]):  # type: ignore[no-untyped-def]
    inventories = engine.recover(engine.inventories())
    p = plan(engine.rules, inventories, engine.site_names)
    return p, engine.execute(p)


def test_second_pass_transfers_nothing_and_history_is_kept(tmp_path: Path) -> None:
    engine, sites = make(tmp_path)
    sites["c1"].add("img-a", os.urandom(5000))
    p, results = one_pass(engine, ["img-a"])
    assert len(p.copies) == 1 and all(r.ok for r in results)
    assert all(len(s.images) == 1 for s in sites.values())
    p2, results2 = one_pass(engine, ["img-a"])
    assert p2.copies == [] and results2 == []
    hist = engine.state.history("img-a")
    assert {h["target"] for h in hist} == {"c2", "c3"} and all(h["result"] == "ok" for h in hist)
    cell = engine.state.cell("img-a", "c2")
    assert cell is not None and cell.state == "current"


def test_a_held_lock_prevents_a_second_copy(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, n=2)
    sites["c1"].add("img-a", b"x" * 100)
    other = State(tmp_path / "state")  # another process's view of the same state dir
    with other.lock("img-a", "c2"):
        _, results = one_pass(engine, ["img-a"])
    assert sites["c2"].images == {}
    assert results[0].targets[0].error_kind == "busy"


def test_copy_found_current_under_the_lock_is_not_repeated(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, n=2)
    sites["c1"].add("img-a", b"x" * 100)
    inventories = engine.inventories()
    p = plan(engine.rules, inventories, ["c1", "c2"])
    one_pass(engine, ["img-a"])  # someone else completes the copy after we planned
    results = engine.execute(p)
    assert len(sites["c2"].images) == 1
    assert results[0].ok and results[0].detail == "nothing to transfer"


def test_crash_leftovers_are_removed_under_the_lock(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, n=2)
    src = sites["c1"].add("img-a", b"y" * 100)
    from imagesync.transfer import new_image_for

    p = plan(engine.rules, engine.inventories(), engine.site_names)
    # after planning, a run crashes and leaves this queued upload behind
    w = sites["c2"].create(new_image_for(src, src.version, "private"))
    w.write(b"y" * 10)
    engine.execute(p)
    (only,) = sites["c2"].images.values()
    assert only.rec.counts and bytes(only.data) == b"y" * 100


def test_failed_target_is_reported_and_others_succeed(tmp_path: Path) -> None:
    engine, sites = make(tmp_path)
    sites["c3"].faults = Faults(flip_byte_on_store=True)
    sites["c1"].add("img-a", os.urandom(3000))
    _, results = one_pass(engine, ["img-a"])
    by_site = {t.site: t for t in results[0].targets}
    assert by_site["c2"].ok and not by_site["c3"].ok
    assert sites["c3"].images == {}
    hist = {h["target"]: h["result"] for h in engine.state.history("img-a")}
    assert hist == {"c2": "ok", "c3": "integrity"}


def test_retention_hides_old_versions_after_the_new_one_lands(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, n=2, keep=1)
    sites["c1"].add("img-a", b"old")
    one_pass(engine, ["img-a"])
    import time

    time.sleep(0.01)
    sites["c1"].add("img-a", b"new")
    one_pass(engine, ["img-a"])  # copies the new version to c2
    one_pass(engine, ["img-a"])  # c2 is current: retire its old copy (made by imagesync)
    hidden = [s.rec for s in sites["c2"].images.values() if s.rec.hidden]
    assert len(hidden) == 1 and bytes(sites["c2"].images[hidden[0].id].data) == b"old"
    # c1's old version was uploaded by a person: kept visible
    assert not any(s.rec.hidden for s in sites["c1"].images.values())


def test_incremental_listing_reads_only_changes_and_lists_fully_now_and_then(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime, timedelta

    engine, sites = make(tmp_path, n=2, list_changes=True)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    sites["c1"].add("img-a", b"a" * 10, created=t0)
    first = engine.inventories(incremental=True)  # full listing, sets the watermark
    assert [r.name for r in first["c1"].images] == ["img-a"]
    assert _changes(sites["c1"]) == 0
    sites["c1"].add("img-b", b"b" * 10, created=t0 + timedelta(hours=1))
    second = engine.inventories(incremental=True)
    assert _changes(sites["c1"]) == 1
    assert sorted(r.name for r in second["c1"].images) == ["img-a", "img-b"]
    # a deletion by someone else is not a change a site can list: seen at the next full one
    gone = next(i for i, st in sites["c1"].images.items() if st.rec.name == "img-a")
    sites["c1"].delete(gone)
    assert len(engine.inventories(incremental=True)["c1"].images) == 2
    engine.inventory_room.full_list_every = 0.0
    assert [r.name for r in engine.inventories(incremental=True)["c1"].images] == ["img-b"]


def test_a_site_imagesync_changed_is_listed_fully_next_time(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, n=2, list_changes=True)
    sites["c1"].add("img-a", b"a" * 10)
    p = plan(engine.rules, engine.inventories(incremental=True), ["c1", "c2"])
    engine.execute(p)  # copies to c2
    calls = _changes(sites["c2"])
    inv = engine.inventories(incremental=True)
    assert _changes(sites["c2"]) == calls  # full listing for c2, not incremental
    assert [r.name for r in inv["c2"].images] == ["img-a"]


def test_reading_never_deletes_a_crash_leftover_recovery_does(tmp_path: Path) -> None:
    engine, sites = make(tmp_path, n=2)
    src = sites["c1"].add("img-a", b"y" * 100)
    from imagesync.transfer import new_image_for

    w = sites["c2"].create(new_image_for(src, src.version, "private"))  # a crashed upload
    listed = engine.inventories()
    assert w.image_id in sites["c2"].images
    assert [r.in_progress for r in listed["c2"].images] == [True]
    recovered = engine.recover(listed)
    assert w.image_id not in sites["c2"].images and recovered["c2"].images == ()


def _changes(site: MemorySite) -> int:
    """How many incremental listings ``site`` has answered."""
    assert isinstance(site, ChangeListingMemorySite)
    return site.changed_calls


def test_a_boot_test_copy_is_published_hidden_marked_pending_and_not_answered(
    tmp_path: Path,
) -> None:
    """A version from c1 with the boot test on c2: the copy to c2 ends hidden, marked
    pending, and is not a cell check answers; nothing else moves until it passed."""
    from imagesync.config.types import BootTest
    from imagesync.model import PROP_BOOT_TEST
    from imagesync.plan import BOOT_TEST_PENDING

    engine, sites = make(tmp_path, boot_test=BootTest("c2", "tiny"))
    sites["c1"].add("img-a", os.urandom(3000))
    p, results = one_pass(engine, ["img-a"])
    assert [(c.targets, c.hidden) for c in p.copies] == [(("c2",), True)]
    assert all(r.ok for r in results) and sites["c3"].images == {}
    (held,) = sites["c2"].list_images("img-a")
    assert held.hidden and held.properties[PROP_BOOT_TEST] == BOOT_TEST_PENDING
    cell = engine.state.cell("img-a", "c2")
    assert cell is None or cell.state != "current"
    p2, results2 = one_pass(engine, ["img-a"])  # held: no second copy, nothing spreads
    assert p2.copies == [] and results2 == [] and sites["c3"].images == {}
    sites["c2"]._change(
        held.id, hidden=False, properties={**held.properties, PROP_BOOT_TEST: "passed"}
    )
    p3, _ = one_pass(engine, ["img-a"])
    assert [c.targets for c in p3.copies] == [("c3",)] and len(sites["c3"].images) == 1
