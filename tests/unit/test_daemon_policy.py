"""Policies the daemon applies every pass: retention modes, sites that cannot hide, and an
idle pass over thousands of names staying fast (planning and recording, no clients)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from imagesync.config.types import Config, ImageRule
from imagesync.execute import Engine
from imagesync.model import (
    PROP_ORIGIN,
    PROP_SHA512,
    PROP_VERSION,
    ImageRecord,
    SiteInventory,
    format_time,
)
from imagesync.plan import Retire, Rule, Skip, plan, plan_name
from imagesync.sites.base import Capabilities
from tests.memsite import MemSite

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def copy_rec(site: str, i: int, *, name: str = "img", hidden: bool = False,
             protected: bool = False, origin: bool = True) -> ImageRecord:
    t = T0 + timedelta(days=i)
    props = {PROP_ORIGIN: f"x:{i}", PROP_VERSION: format_time(t),
             PROP_SHA512: f"{i:x}" * 128} if origin else {}
    return ImageRecord(site=site, id=f"{site}-{name}-{i}", name=name, status="active",
                       created_at=t, size=10, hashes={"sha512": (f"{i:x}" * 128)[:128]},
                       properties=props, hidden=hidden, protected=protected)


def inv(*recs: ImageRecord) -> dict[str, SiteInventory]:
    return {"a": SiteInventory("a", tuple(recs))}


def test_retire_delete_also_deletes_versions_hidden_earlier() -> None:
    rule = Rule(pattern="img", sites=("a",), keep=2, retire="delete")
    old_hidden = copy_rec("a", 0, hidden=True)
    v1, v2, v3 = (copy_rec("a", i) for i in (1, 2, 3))
    _, actions = plan_name("img", rule, inv(old_hidden, v1, v2, v3), ["a"])
    retires = sorted((a.image_id, a.mode) for a in actions if isinstance(a, Retire))
    assert retires == [(old_hidden.id, "delete"), (v1.id, "delete")]


def test_retire_hide_leaves_hidden_versions_alone() -> None:
    rule = Rule(pattern="img", sites=("a",), keep=2)
    old_hidden = copy_rec("a", 0, hidden=True)
    v1, v2, v3 = (copy_rec("a", i) for i in (1, 2, 3))
    _, actions = plan_name("img", rule, inv(old_hidden, v1, v2, v3), ["a"])
    assert [(a.image_id, a.mode) for a in actions if isinstance(a, Retire)] == [(v1.id, "hide")]


def test_hidden_protected_or_foreign_versions_are_never_deleted() -> None:
    rule = Rule(pattern="img", sites=("a",), keep=1, retire="delete")
    hidden_protected = copy_rec("a", 0, hidden=True, protected=True)
    hidden_foreign = copy_rec("a", 1, hidden=True, origin=False)
    newest = copy_rec("a", 5)
    _, actions = plan_name("img", rule, inv(hidden_protected, hidden_foreign, newest), ["a"])
    assert not [a for a in actions if isinstance(a, Retire)]


def test_a_hidden_copy_of_a_kept_version_is_not_deleted() -> None:
    rule = Rule(pattern="img", sites=("a",), keep=1, retire="delete")
    newest = copy_rec("a", 5)
    dup = copy_rec("a", 5, hidden=True).with_(id="a-dup")
    _, actions = plan_name("img", rule, inv(newest, dup), ["a"])
    assert not [a for a in actions if isinstance(a, Retire)]


class NoHideSite(MemSite):
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(hashes=frozenset({"sha512"}), hide=False)


def _engine(tmp_path: Path, sites: dict[str, MemSite], **rule: object) -> Engine:
    config = Config(path=tmp_path / "imagesync.yaml", state_dir=tmp_path / "state",
                    poll_interval=60, clouds={}, stores={},
                    images=(ImageRule(pattern="img*", clouds=tuple(sites),
                                      **rule),),  # type: ignore[arg-type]
                    transfer_retries=1)
    return Engine(config, sites=sites)


def test_a_site_that_cannot_hide_keeps_old_versions_unless_delete_is_configured(
        tmp_path: Path) -> None:
    for mode, survivors in (("hide", 2), ("delete", 1)):
        site = NoHideSite("a")
        old = site.add("img", b"old", created=T0, props={PROP_ORIGIN: "x:1",
                                                          PROP_VERSION: format_time(T0)})
        site.add("img", b"new", created=T0 + timedelta(days=1),
                 props={PROP_ORIGIN: "x:2", PROP_VERSION: format_time(T0 + timedelta(days=1))})
        engine = _engine(tmp_path / mode, {"a": site}, keep=1, retire=mode)
        p = plan(engine.rules, engine.inventories(), ["a"])
        (retire,) = p.retires
        assert retire.image_id == old.id
        results = engine.execute(p)
        assert all(r.ok for r in results)
        assert len(site.images) == survivors, mode


def test_planning_and_recording_thousands_of_names_is_fast(tmp_path: Path) -> None:
    n = 2000
    sites = ("a", "b", "c")
    originals = [ImageRecord(site="a", id=f"a-{i}", name=f"img-{i:04d}", status="active",
                             created_at=T0, size=1, hashes={"sha512": "e" * 128})
                 for i in range(n)]
    inventories = {"a": SiteInventory("a", tuple(originals))}
    for s in sites[1:]:
        inventories[s] = SiteInventory(s, tuple(
            o.with_(site=s, id=f"{s}-{i}", created_at=T0 + timedelta(minutes=1),
                    properties={PROP_ORIGIN: o.ref, PROP_VERSION: format_time(T0),
                                PROP_SHA512: "e" * 128})
            for i, o in enumerate(originals)))
    rule = Rule(pattern="img-*", sites=sites, keep=2)
    t0 = time.perf_counter()
    p = plan([rule], inventories, sites)
    planned = time.perf_counter() - t0
    assert p.actions == [] and len(p.assessments) == n
    assert planned < 1.0, f"planning {n} names took {planned:.2f}s"

    engine = _engine(tmp_path, {s: MemSite(s) for s in sites})
    t0 = time.perf_counter()
    engine.record(p.assessments, [])
    recorded = time.perf_counter() - t0
    assert len(engine.state.cells()) == n * len(sites)
    assert recorded < 1.0, f"recording {n * len(sites)} cells took {recorded:.2f}s"


def test_the_index_gives_the_same_plan_as_a_scan() -> None:
    from imagesync.plan import plan_name as one

    recs = [copy_rec("a", i, name=f"img-{i % 3}") for i in range(9)]
    inventories = inv(*recs) | {"b": SiteInventory("b", error="down")}
    rule = Rule(pattern="img-*", sites=("a", "b"), keep=1)
    p = plan([rule], inventories, ["a", "b"])
    expected = []
    for name in ("img-0", "img-1", "img-2"):
        expected.extend(one(name, rule, inventories, ["a", "b"])[1])
    assert p.actions == expected
    assert any(isinstance(a, Skip) and a.site == "b" for a in p.actions)


