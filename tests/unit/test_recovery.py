"""What recovery may delete, and when (issue 8, items 4-6).

- A published image is never removed on the word of an old listing or a lease: recovery
  re-reads it under the lock (a push racing the daemon; ``kill -9`` between ``publish()`` and
  dropping the lease).
- The directory store's publish is crash-atomic: a crash at any step of it leaves either an
  upload (which recovery removes whole) or the published, verifiable image.
- Another instance's upload (another ``state_dir``) is left alone until its lease expires.
- ``retire: delete`` asks the site which images servers use, and hides instead when it
  cannot tell.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from imagesync.engine import Engine
from imagesync.engine.marker import PROP_UPLOAD, SKEW_GRACE, UploadMarker, lease_seconds
from imagesync.engine.results import Outcome
from imagesync.errors import NotFound
from imagesync.model import PROP_SHA512, ImageRecord
from imagesync.plan import Retire, plan
from imagesync.sites.base import Site
from imagesync.sites.directory import DirectorySite
from imagesync.sites.memory import Faults, MemorySite
from imagesync.state import State
from imagesync.transfer import new_image_for
from tests.unit.memconfig import memory_config

KB = 1024


def make(tmp_path: Path, sites: dict[str, Site], state: str = "state", **rule: Any) -> Engine:
    config = memory_config(tmp_path, sites, rule=rule, state=state, transfer_retries=0)
    return Engine(config, sites=sites)


def _upload(site: Site, src: ImageRecord, data: bytes) -> ImageRecord:
    """An upload written and finished, not yet published (as a push holds it)."""
    w = site.create(new_image_for(src, src.version, "private"))
    w.write(data)
    return w.finish()


# -- item 4: recovery re-reads under the lock --------------------------------------------------
def test_an_upload_published_after_the_daemon_listed_it_is_not_deleted(tmp_path: Path) -> None:
    """A push publishes between the daemon's listing and its recovery."""
    sites = {"c1": MemorySite("c1"), "c2": MemorySite("c2")}
    data = os.urandom(3 * KB)
    src = sites["c1"].add("img-a", data)
    engine = make(tmp_path, dict(sites))
    push = State(tmp_path / "state")  # the push's process: same state dir
    with push.lock("img-a", "c2"):
        stored = _upload(sites["c2"], src, data)
        listed = engine.inventories()  # the daemon lists: an upload in flight
        assert [r.in_progress for r in listed["c2"].images] == [True]
        sites["c2"].publish(stored.id, {PROP_SHA512: hashlib.sha512(data).hexdigest()})
    # the push has released the lock; the daemon recovers with its listing
    recovered = engine.recover(listed)
    assert sites["c2"].data(stored.id) == data
    (rec,) = recovered["c2"].images
    assert rec.id == stored.id and not rec.in_progress and rec.counts


def test_kill_between_publish_and_dropping_the_lease_keeps_the_image(tmp_path: Path) -> None:
    sites = {"c1": MemorySite("c1"), "c2": MemorySite("c2")}
    data = os.urandom(2 * KB)
    src = sites["c1"].add("img-a", data)
    engine = make(tmp_path, dict(sites))
    stored = _upload(sites["c2"], src, data)
    engine.state.add_lease("c2", stored.id, "img-a")
    sites["c2"].publish(stored.id)  # ... and the process is killed here: the lease stays
    with capture_logs() as logs:
        recovered = engine.recover(engine.inventories())
    assert sites["c2"].data(stored.id) == data
    assert engine.state.leases() == []
    assert [r.id for r in recovered["c2"].images] == [stored.id]
    assert any(e["event"] == "cleanup.kept_published" for e in logs)
    assert not any(e["event"] == "cleanup.leftover" for e in logs)


class Killed(BaseException):
    """kill -9 at this point: nothing after it runs (no handler catches it)."""


def test_a_copy_published_before_a_kill_is_retired_like_any_other(tmp_path: Path) -> None:
    """A fan-out copy publishes on one target, then the process dies before the copy ends
    (found by the fault suite, tests/faults.py): the published copy is still imagesync's, so
    retention retires it when newer versions land, instead of keeping it visible forever."""
    c1, c2, c3 = MemorySite("c1"), MemorySite("c2"), MemorySite("c3")
    c1.add("img-a", b"v1" * KB, created=_now(-120))

    def die_finishing(op: str, image_id: str | None) -> None:
        if op == "finish":
            raise Killed  # c2 (settled first) is published by now

    c3.faults.hook = die_finishing
    sites: dict[str, Site] = {"c1": c1, "c2": c2, "c3": c3}
    engine = make(tmp_path, dict(sites), keep=1)
    with pytest.raises(Killed):
        engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
    (copy,) = [s.rec for s in c2.images.values() if s.published]
    c3.faults.hook = None
    # the restart: a new process, the same state; then a newer version lands
    engine = make(tmp_path, dict(sites), keep=1)
    engine.execute(plan(engine.rules, engine.recover(engine.inventories()), engine.site_names))
    c1.add("img-a", b"v2" * KB, created=_now(-60))
    for _ in range(2):  # copy the new version; retire the old one where it is current
        engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
    assert copy.id in engine.state.made()["c2"]
    assert c2.images[copy.id].rec.hidden  # retired (hidden), not kept visible forever


def test_a_lease_whose_image_is_gone_is_dropped(tmp_path: Path) -> None:
    sites = {"c1": MemorySite("c1"), "c2": MemorySite("c2")}
    engine = make(tmp_path, dict(sites))
    engine.state.add_lease("c2", "0123-gone", "img-a")
    engine.recover(engine.inventories())
    assert engine.state.leases() == []


def test_clean_locked_keeps_what_was_published_since_it_was_listed(tmp_path: Path) -> None:
    sites = {"c1": MemorySite("c1"), "c2": MemorySite("c2")}
    data = os.urandom(KB)
    src = sites["c1"].add("img-a", data)
    engine = make(tmp_path, dict(sites))
    stored = _upload(sites["c2"], src, data)
    stale = sites["c2"].list_images("img-a")
    sites["c2"].publish(stored.id)
    kept = engine.recovery.clean_locked("c2", "img-a", stale)
    assert [r.id for r in kept] == [stored.id] and kept[0].counts
    assert sites["c2"].data(stored.id) == data


def test_an_upload_still_marked_and_unlocked_is_removed(tmp_path: Path) -> None:
    """The rule that stays: a leftover of our own instance whose lock is free goes."""
    sites = {"c1": MemorySite("c1"), "c2": MemorySite("c2")}
    src = sites["c1"].add("img-a", b"a" * KB)
    engine = make(tmp_path, dict(sites))
    stored = _upload(sites["c2"], src, b"a" * KB)
    engine.state.add_lease("c2", stored.id, "img-a")
    recovered = engine.recover(engine.inventories())
    assert sites["c2"].images == {} and recovered["c2"].images == ()
    assert engine.state.leases() == []


# -- item 4: the directory store's publish, crashed at every step ------------------------------
class _Crash(BaseException):
    """kill -9: nothing after it runs (not an Exception: no handler catches it)."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int) -> list[str]:
    """Make the k-th file system step (replace, rename, unlink, fsync) raise _Crash."""
    steps: list[str] = []

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            steps.append(name)
            if len(steps) == k:
                raise _Crash(name)
            return real(*args, **kwargs)

        return step

    for name in ("replace", "rename", "unlink", "fsync"):
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return steps


def test_directory_publish_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    data = os.urandom(5 * KB)
    sha = hashlib.sha512(data).hexdigest()
    outcomes: set[str] = set()
    for k in range(1, 30):
        root = tmp_path / f"k{k}" / "store"
        root.mkdir(parents=True)
        src_site = MemorySite("src")
        src = src_site.add("img-a", data)
        stored = _upload(DirectorySite("d", root), src, data)
        state = State(tmp_path / f"k{k}" / "state")
        state.add_lease("d", stored.id, "img-a")
        with pytest.MonkeyPatch.context() as mp:
            steps = _crash_at(mp, k)
            try:
                DirectorySite("d", root).publish(stored.id, {PROP_SHA512: sha})
                crashed = False
            except _Crash:
                crashed = True
        # restart: a fresh site and engine over what is on disk
        site = DirectorySite("d", root)
        engine = make(tmp_path / f"k{k}", {"src": src_site, "d": site})
        engine.state.close()
        engine.state = engine.recovery.state = engine.executor.state = state
        recovered = engine.recover(engine.inventories())
        listed = site.list_images("img-a")
        assert state.leases() == [], f"crash at step {k} ({steps[-1:]}): lease left"
        if listed:
            (rec,) = listed
            assert [r.id for r in recovered["d"].images] == [stored.id]
            assert rec.counts and not rec.hidden and rec.properties[PROP_SHA512] == sha
            assert hashlib.sha512(b"".join(site.open(rec))).hexdigest() == sha
            outcomes.add("published")
        else:
            with pytest.raises(NotFound):
                site.get_image(stored.id)
            assert [p.name for p in root.rglob("*")] == []  # nothing half-made is left
            outcomes.add("removed")
        if not crashed:
            break
    else:
        pytest.fail("publish never finished")
    # Crashes before the commit point leave an upload, after it the published image.
    assert outcomes == {"published", "removed"}


def test_directory_lists_a_published_id_once_beside_a_stale_hidden_meta(tmp_path: Path) -> None:
    """An older version's publish crashed after writing {id}.json, before removing .{id}.json."""
    data = os.urandom(KB)
    src = MemorySite("src").add("img-a", data)
    site = DirectorySite("d", tmp_path)
    stored = _upload(site, src, data)
    hidden = tmp_path / "img-a" / f".{stored.id}.json"
    stale = hidden.read_bytes()
    site.publish(stored.id)
    hidden.write_bytes(stale)
    (rec,) = site.list_images("img-a")
    assert rec.counts and not rec.in_progress
    assert not site.get_image(stored.id).in_progress
    site.publish(stored.id)  # publishing again finishes the interrupted publish
    assert not hidden.exists()


# -- item 5: another instance's uploads ---------------------------------------------------------
def _second_engine_runs_during_the_first_upload(
    tmp_path: Path, clock: Callable[[], float]
) -> tuple[bool, bool, dict[str, str]]:
    """Engine 1 copies img-a c1 → c2; while its upload is being written, engine 2 (another
    state dir, clock ``clock``) recovers. Returns (upload survived, copy ok, marker)."""
    seen: dict[str, Any] = {}
    c2 = MemorySite("c2")
    sites: dict[str, MemorySite] = {"c1": MemorySite("c1"), "c2": c2}
    data = os.urandom(5 * KB)
    sites["c1"].add("img-a", data)
    first = make(tmp_path, dict(sites), state="state-1")
    second = make(tmp_path, dict(sites), state="state-2")
    second.recovery.clock = clock

    def during_write(op: str, image_id: str | None) -> None:
        if op != "write" or "ran" in seen:
            return
        seen["ran"] = True
        assert image_id is not None
        seen["marker"] = c2.images[image_id].rec.properties.get(PROP_UPLOAD)
        second.recover(second.inventories())
        seen["survived"] = image_id in c2.images

    c2.faults = Faults(hook=during_write)
    p = plan(first.rules, first.inventories(), first.site_names)
    results = first.execute(p)
    return bool(seen["survived"]), results[0].ok, {"marker": seen["marker"]}


def test_a_second_instance_leaves_the_first_ones_live_upload_alone(tmp_path: Path) -> None:
    survived, ok, seen = _second_engine_runs_during_the_first_upload(tmp_path, time.time)
    assert survived and ok
    marker = UploadMarker.of(
        ImageRecord("c2", "x", "img-a", "queued", _now(), properties={PROP_UPLOAD: seen["marker"]})
    )
    assert marker is not None
    assert marker.instance == State(tmp_path / "state-1").instance_id
    assert marker.instance != State(tmp_path / "state-2").instance_id


def test_after_its_lease_expired_another_instance_removes_the_upload(tmp_path: Path) -> None:
    late = time.time() + lease_seconds(5 * KB) + SKEW_GRACE + 60
    survived, ok, _ = _second_engine_runs_during_the_first_upload(tmp_path, lambda: late)
    assert not survived and not ok


def test_the_marker_is_not_copied_onwards(tmp_path: Path) -> None:
    sites: dict[str, MemorySite] = {n: MemorySite(n) for n in ("c1", "c2", "c3")}
    sites["c1"].add("img-a", b"z" * KB)
    engine = make(tmp_path, {"c1": sites["c1"], "c2": sites["c2"]})
    engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
    (copy,) = sites["c2"].images.values()
    assert PROP_UPLOAD in copy.rec.properties  # who made this copy stays on record
    assert PROP_UPLOAD not in new_image_for(copy.rec, copy.rec.version, "private").properties


def test_an_upload_that_outlived_its_lease_is_removed_not_published(tmp_path: Path) -> None:
    sites: dict[str, MemorySite] = {"c1": MemorySite("c1"), "c2": MemorySite("c2")}
    sites["c1"].add("img-a", b"q" * KB)
    engine = make(tmp_path, dict(sites))
    ticks = iter([1000.0, 1000.0 + lease_seconds(KB) + 1])  # marker written, then publish
    engine.executor.clock = lambda: next(ticks)
    results = engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
    (target,) = results[0].targets
    assert not target.ok and "outlived its lease" in (target.error or "")
    assert sites["c2"].images == {}


def test_the_instance_id_is_stable_per_state_dir(tmp_path: Path) -> None:
    a = State(tmp_path / "a").instance_id
    assert State(tmp_path / "a").instance_id == a
    assert State(tmp_path / "b").instance_id != a


# -- item 6: in-use protection --------------------------------------------------------------
class InUseMemorySite(MemorySite):
    """A memory site that can tell which images servers use (``servers``: image ids), or
    that cannot tell now (``servers`` None)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.servers: set[str] | None = set()

    def images_in_use(self) -> set[str] | None:
        return None if self.servers is None else set(self.servers)


def _old_and_new(tmp_path: Path, site: MemorySite) -> tuple[Engine, ImageRecord, Retire]:
    """img-a on c1 in two versions; c2 holds imagesync's copies of both; the plan retires
    the old copy on c2 (keep=1, retire: delete). Returns the engine, the old copy, the
    retirement."""
    c1 = MemorySite("c1")
    c1.add("img-a", b"old", created=_now(-120))
    engine = make(tmp_path, {"c1": c1, "c2": site}, keep=1, retire="delete")
    engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
    (old,) = site.images.values()
    c1.add("img-a", b"new", created=_now(-60))
    engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    (retire,) = p.retires
    assert retire.site == "c2" and retire.image_id == old.rec.id and retire.mode == "delete"
    return engine, old.rec, retire


def test_retire_delete_on_a_site_that_cannot_tell_hides_and_says_why(tmp_path: Path) -> None:
    site = MemorySite("c2")  # no in-use reporting
    engine, old, retire = _old_and_new(tmp_path, site)
    with capture_logs() as logs:
        result = engine.run_retire(retire)
    assert result.ok and old.id in site.images and site.images[old.id].rec.hidden
    assert "hide instead of delete" in result.detail and "cannot tell" in result.detail
    (event,) = [e for e in logs if e["event"] == "retire.done"]
    assert event["mode"] == "hide" and "cannot tell" in event["fallback"]
    row = engine.state.history("img-a")[0]
    assert row["result"] == "retired:hide" and "cannot tell" in row["error"]


def test_retire_delete_keeps_an_image_a_server_started_using_since_the_plan(
    tmp_path: Path,
) -> None:
    site = InUseMemorySite("c2")
    engine, old, retire = _old_and_new(tmp_path, site)
    site.servers = {old.id}  # a server boots from the old copy after the plan was made
    result = engine.run_retire(retire)
    assert result.outcome is Outcome.KEPT and "a server uses it" in result.detail
    assert old.id in site.images and not site.images[old.id].rec.hidden


def test_retire_delete_deletes_when_the_site_says_no_server_uses_it(tmp_path: Path) -> None:
    site = InUseMemorySite("c2")
    engine, old, retire = _old_and_new(tmp_path, site)
    result = engine.run_retire(retire)
    assert result.ok and result.detail == "delete" and old.id not in site.images


def test_a_site_that_cannot_tell_now_gets_its_image_hidden(tmp_path: Path) -> None:
    site = InUseMemorySite("c2")
    engine, old, retire = _old_and_new(tmp_path, site)
    site.servers = None  # Nova failed just now
    result = engine.run_retire(retire)
    assert result.ok and site.images[old.id].rec.hidden and "cannot tell now" in result.detail


def test_the_planner_keeps_images_servers_use(tmp_path: Path) -> None:
    site = InUseMemorySite("c2")
    engine, old, _ = _old_and_new(tmp_path, site)
    site.servers = {old.id}
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    assert p.retires == [] and any("a server uses it" in s.reason for s in p.skips)


def _now(offset: float = 0.0) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=offset)


def test_retire_delete_deletes_in_a_directory_store_no_server_boots_from(tmp_path: Path) -> None:
    store = DirectorySite("d", tmp_path / "store")
    (tmp_path / "store").mkdir()
    c1 = MemorySite("c1")
    c1.add("img-a", b"old", created=_now(-120))
    engine = make(tmp_path, {"c1": c1, "d": store}, keep=1, retire="delete")
    engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
    (old,) = store.list_images("img-a")
    c1.add("img-a", b"new", created=_now(-60))
    engine.execute(plan(engine.rules, engine.inventories(), engine.site_names))
    (retire,) = [r for r in plan(engine.rules, engine.inventories(), ["c1", "d"]).retires]
    result = engine.run_retire(retire)
    assert result.ok and result.detail == "delete"
    with pytest.raises(NotFound):
        store.get_image(old.id)


def test_a_copy_hidden_for_want_of_in_use_knowledge_is_not_retired_again(
    tmp_path: Path,
) -> None:
    site = MemorySite("c2")  # cannot tell which images servers use
    engine, old, retire = _old_and_new(tmp_path, site)
    engine.run_retire(retire)
    assert site.images[old.id].rec.hidden
    p = plan(engine.rules, engine.inventories(), engine.site_names)
    assert p.retires == []  # not re-hidden (and re-recorded) every pass
