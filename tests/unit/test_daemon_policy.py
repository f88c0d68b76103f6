"""Policies the daemon applies every pass: retention modes, sites that cannot hide, and an
idle pass over thousands of names staying cheap (records read, transactions; no clients)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from imagesync.engine import Engine
from imagesync.model import (
    PROP_ORIGIN,
    ImageRecord,
    SiteInventory,
)
from imagesync.plan import Retire, Skip, TargetRule, plan, plan_name
from imagesync.sites.base import Capabilities
from imagesync.sites.memory import MemorySite
from tests.unit.marks import copy_marks
from tests.unit.memconfig import memory_config

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def copy_rec(
    site: str,
    i: int,
    *,
    name: str = "img",
    hidden: bool = False,
    protected: bool = False,
    origin: bool = True,
) -> ImageRecord:
    t = T0 + timedelta(days=i)
    props = copy_marks(f"x:{i}", t, f"{i:x}" * 128) if origin else {}
    return ImageRecord(
        site=site,
        id=f"{site}-{name}-{i}",
        name=name,
        status="active",
        created_at=t,
        size=10,
        hashes={"sha512": (f"{i:x}" * 128)[:128]},
        properties=props,
        hidden=hidden,
        protected=protected,
    )


def inv(*recs: ImageRecord) -> dict[str, SiteInventory]:
    """Site a holding ``recs``; imagesync recorded making those that carry its marks."""
    made = frozenset(r.id for r in recs if PROP_ORIGIN in r.properties)
    return {"a": SiteInventory("a", tuple(recs), made=made)}


def test_retire_delete_also_deletes_versions_hidden_earlier() -> None:
    rule = TargetRule(pattern="img", sites=("a",), keep=2, retire="delete")
    old_hidden = copy_rec("a", 0, hidden=True)
    v1, v2, v3 = (copy_rec("a", i) for i in (1, 2, 3))
    # a site that can tell which images servers use (none here)
    recs = (old_hidden, v1, v2, v3)
    told = {"a": SiteInventory("a", recs, in_use=frozenset(), made=inv(*recs)["a"].made)}
    _, actions = plan_name("img", rule, told, ["a"])
    retires = sorted((a.image_id, a.mode) for a in actions if isinstance(a, Retire))
    assert retires == [(old_hidden.id, "delete"), (v1.id, "delete")]
    # one that cannot tell hid v1 instead of deleting it: hidden ones are left hidden
    _, actions = plan_name("img", rule, inv(old_hidden, v1, v2, v3), ["a"])
    assert [(a.image_id, a.mode) for a in actions if isinstance(a, Retire)] == [(v1.id, "delete")]


def test_retire_hide_leaves_hidden_versions_alone() -> None:
    rule = TargetRule(pattern="img", sites=("a",), keep=2)
    old_hidden = copy_rec("a", 0, hidden=True)
    v1, v2, v3 = (copy_rec("a", i) for i in (1, 2, 3))
    _, actions = plan_name("img", rule, inv(old_hidden, v1, v2, v3), ["a"])
    assert [(a.image_id, a.mode) for a in actions if isinstance(a, Retire)] == [(v1.id, "hide")]


def test_hidden_protected_or_foreign_versions_are_never_deleted() -> None:
    rule = TargetRule(pattern="img", sites=("a",), keep=1, retire="delete")
    hidden_protected = copy_rec("a", 0, hidden=True, protected=True)
    hidden_foreign = copy_rec("a", 1, hidden=True, origin=False)
    newest = copy_rec("a", 5)
    _, actions = plan_name("img", rule, inv(hidden_protected, hidden_foreign, newest), ["a"])
    assert not [a for a in actions if isinstance(a, Retire)]


def test_a_hidden_copy_of_a_kept_version_is_not_deleted() -> None:
    rule = TargetRule(pattern="img", sites=("a",), keep=1, retire="delete")
    newest = copy_rec("a", 5)
    dup = copy_rec("a", 5, hidden=True).with_(id="a-dup")
    _, actions = plan_name("img", rule, inv(newest, dup), ["a"])
    assert not [a for a in actions if isinstance(a, Retire)]


class NoHideSite(MemorySite):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        # a store that cannot hide (say VOSpace): no server boots from it, so it can tell
        # that none uses its images (a cloud that cannot tell would hide instead of delete)
        self.capabilities = Capabilities(hashes=frozenset({"sha512"}), images_in_use=set)


def _engine(tmp_path: Path, sites: dict[str, MemorySite], **rule: object) -> Engine:
    return Engine(memory_config(tmp_path, sites, rule=rule), sites=sites)


def test_a_site_that_cannot_hide_keeps_old_versions_unless_delete_is_configured(
    tmp_path: Path,
) -> None:
    for mode, survivors in (("hide", 2), ("delete", 1)):
        site = NoHideSite("a")
        old = site.add("img", b"old", created=T0, props=copy_marks("x:1", T0))
        site.add(
            "img",
            b"new",
            created=T0 + timedelta(days=1),
            props=copy_marks("x:2", T0 + timedelta(days=1)),
        )
        engine = _engine(tmp_path / mode, {"a": site}, keep=1, retire=mode)
        engine.state.record_made("a", old.id, "img")  # as if imagesync had copied it there
        p = plan(engine.rules, engine.inventories(), ["a"])
        (retire,) = p.retires
        assert retire.image_id == old.id
        results = engine.execute(p)
        assert all(r.ok for r in results)
        assert len(site.images) == survivors, mode


class CountedImages(tuple[ImageRecord, ...]):
    """A site's images that count every record read through them."""

    reads = 0

    def __iter__(self) -> Iterator[ImageRecord]:
        for rec in super().__iter__():
            CountedImages.reads += 1
            yield rec


def _originals(n: int) -> list[ImageRecord]:
    """``n`` originals on site a, each of its own name (img-0000, ...), of one size and hash."""
    return [
        ImageRecord(
            site="a",
            id=f"a-{i}",
            name=f"img-{i:04d}",
            status="active",
            created_at=T0,
            size=1,
            hashes={"sha512": "e" * 128},
        )
        for i in range(n)
    ]


def test_planning_thousands_of_names_reads_each_record_a_few_times_not_once_a_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An idle pass over thousands of names stays fast when planning groups the images by
    # name once: a scan of every site per name would read n * n records (12 million here).
    n = 2000
    sites = ("a", "b", "c")
    originals = _originals(n)
    inventories = {"a": SiteInventory("a", CountedImages(originals))}
    for s in sites[1:]:
        inventories[s] = SiteInventory(
            s,
            CountedImages(
                o.with_(
                    site=s,
                    id=f"{s}-{i}",
                    created_at=T0 + timedelta(minutes=1),
                    properties=copy_marks(o.ref, T0, "e" * 128),
                )
                for i, o in enumerate(originals)
            ),
        )
    monkeypatch.setattr(CountedImages, "reads", 0)
    p = plan([TargetRule(pattern="img-*", sites=sites, keep=2)], inventories, sites)
    assert p.actions == [] and len(p.assessments) == n
    records = n * len(sites)
    assert records <= CountedImages.reads <= 3 * records  # every record, a few times


def test_recording_thousands_of_cells_is_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One commit, not one per cell: each commit is a disk sync.
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db: sqlite3.Connection = connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    n = 2000
    sites = ("a", "b", "c")
    rule = TargetRule(pattern="img-*", sites=sites)
    inventories = {"a": SiteInventory("a", tuple(_originals(n)))}
    inventories |= {s: SiteInventory(s) for s in sites[1:]}
    p = plan([rule], inventories, sites)
    engine = _engine(tmp_path, {s: MemorySite(s) for s in sites})
    statements.clear()
    engine.record(p.assessments, [])
    assert len(engine.state.cells()) == n * len(sites)
    begins = [i for i, sql in enumerate(statements) if sql.startswith("BEGIN")]
    commits = [i for i, sql in enumerate(statements) if sql.startswith("COMMIT")]
    inserts = [i for i, sql in enumerate(statements) if sql.startswith("INSERT")]
    assert len(begins) == 1 and len(commits) == 1
    assert inserts and begins[0] < min(inserts) and max(inserts) < commits[0]


def test_the_index_gives_the_same_plan_as_a_scan() -> None:
    from imagesync.plan import plan_name as one

    recs = [copy_rec("a", i, name=f"img-{i % 3}") for i in range(9)]
    inventories = inv(*recs) | {"b": SiteInventory("b", error="down")}
    rule = TargetRule(pattern="img-*", sites=("a", "b"), keep=1)
    p = plan([rule], inventories, ["a", "b"])
    expected = []
    for name in ("img-0", "img-1", "img-2"):
        expected.extend(one(name, rule, inventories, ["a", "b"])[1])
    assert p.actions == expected
    assert any(isinstance(a, Skip) and a.site == "b" for a in p.actions)
