"""The pure planner: version choice, placement, redundancy, mismatch, retention. No clients."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from imagesync.model import PROP_ORIGIN, PROP_STATE, ImageRecord, SiteInventory
from imagesync.plan import Copy, Retire, Skip, SkipReason, TargetRule, assess, plan, plan_name
from tests.unit.marks import copy_marks

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SITES = ("a", "b", "c", "store")


def sha(ch: str) -> str:
    return ch * 128


_n = 0


def img(
    site: str,
    name: str = "img",
    *,
    t: datetime = T0,
    digest: str = "1",
    copy_of: str | None = None,
    version: datetime | None = None,
    status: str = "active",
    **kw: object,
) -> ImageRecord:
    global _n
    _n += 1
    props: dict[str, str] = dict(kw.pop("props", {}) or {})  # type: ignore[call-overload]
    if copy_of:
        props.update(copy_marks(copy_of, version or t, sha(digest)))
    return ImageRecord(
        site=site,
        id=f"{site}-{_n:04d}",
        name=name,
        status=status,
        created_at=t,
        size=100,
        hashes={"sha512": sha(digest)},
        properties=props,
        **kw,  # type: ignore[arg-type]
    )


def inv(
    *records: ImageRecord, down: tuple[str, ...] = (), made: frozenset[str] | None = None
) -> dict[str, SiteInventory]:
    """Every site's inventory. imagesync recorded making ``made`` (default: every record that
    carries its provenance marks)."""
    if made is None:
        made = frozenset(r.id for r in records if PROP_ORIGIN in r.properties)
    out = {s: SiteInventory(s, tuple(r for r in records if r.site == s), made=made) for s in SITES}
    for s in down:
        out[s] = SiteInventory(s, error="connection refused")
    return out


RULE = TargetRule(pattern="img*", sites=("a", "b", "c", "store"))


def test_newest_version_is_copied_everywhere_it_is_missing() -> None:
    old = img("a", t=T0, digest="1")
    new = img("b", t=T0 + timedelta(hours=1), digest="2")
    p = plan([RULE], inv(old, new), SITES)
    copies = p.copies
    assert len(copies) == 1
    c = copies[0]
    assert (c.source_site, c.source_id) == ("b", new.id)
    assert c.targets == ("a", "c", "store")
    cells = p.assessments[0].cells
    assert cells["a"].state == "stale" and cells["b"].state == "current"
    assert cells["c"].state == "missing"


def test_everything_current_plans_nothing() -> None:
    orig = img("a", digest="1")
    copies = [
        img(s, t=T0 + timedelta(days=1), digest="1", copy_of=orig.ref, version=T0)
        for s in ("b", "c", "store")
    ]
    p = plan([RULE], inv(orig, *copies), SITES)
    assert p.actions == []


def test_a_copy_made_later_does_not_beat_a_newer_original() -> None:
    # The copy of v1 was made after v2 was uploaded, but v2 is still the newest version.
    v1 = img("a", t=T0, digest="1")
    v2 = img("b", t=T0 + timedelta(hours=1), digest="2")
    late_copy = img("c", t=T0 + timedelta(hours=5), digest="1", copy_of=v1.ref, version=T0)
    a = assess("img", inv(v1, v2, late_copy), SITES)
    assert a.newest is not None and a.newest.origin == v2.ref
    assert a.cells["c"].state == "stale"


def test_same_bytes_uploaded_twice_are_current_and_newest_by_time() -> None:
    # unknown-sha original + verified copy (same origin) form one version
    orig = img("a", digest="1")
    orig = orig.with_(hashes={"md5": "f" * 32})
    copy = img("b", t=T0 + timedelta(hours=2), digest="1", copy_of=orig.ref, version=T0)
    a = assess("img", inv(orig, copy), SITES)
    assert a.cells["a"].state == "current" and a.cells["b"].state == "current"
    assert a.newest is not None and a.newest.sha512 == sha("1")


def test_duplicates_of_the_newest_version_are_picked_deterministically() -> None:
    first = img("a", t=T0, digest="1")
    dup = img("a", t=T0 + timedelta(minutes=1), digest="1", copy_of=first.ref, version=T0)
    for order in ((first, dup), (dup, first)):
        a = assess("img", inv(*order), SITES)
        cell = a.cells["a"]
        assert cell.image is not None and cell.image.id == first.id
        assert cell.duplicates == (dup.id,)


def test_in_progress_and_queued_images_are_not_versions() -> None:
    good = img("a", t=T0)
    half = img("b", t=T0 + timedelta(hours=1), digest="9", props={PROP_STATE: "uploading"})
    queued = img("c", t=T0 + timedelta(hours=2), digest="8", status="queued")
    a = assess("img", inv(good, half, queued), SITES)
    assert a.newest is not None and a.newest.origin == good.ref
    assert a.cells["b"].state == "in-flight"
    p = plan([RULE], inv(good, half, queued), SITES)
    assert p.copies[0].targets == ("c", "store")
    assert any(isinstance(s, Skip) and s.site == "b" for s in p.actions)


def test_unreachable_site_is_skipped_not_failed() -> None:
    orig = img("a")
    p = plan([RULE], inv(orig, down=("b",)), SITES)
    assert p.copies[0].targets == ("c", "store")
    assert Skip("img", "b", SkipReason.UNREACHABLE, "site unreachable") in p.actions


def test_volume_backed_newest_is_reported_not_copyable() -> None:
    vb = img("a", t=T0, props={"block_device_mapping": "[{}]"}).with_(size=0)
    p = plan([RULE], inv(vb), SITES)
    assert not p.copies
    assert any(s.why is SkipReason.NOT_COPYABLE for s in p.skips)
    assert p.assessments[0].cells["b"].state == "not-copyable"


def test_mismatch_is_reported_and_left_alone_by_default() -> None:
    orig = img("a", t=T0, digest="1")
    other = img("b", t=T0, digest="2")  # same version time, different bytes
    a = assess("img", inv(orig, other), SITES)
    newest = a.newest
    assert newest is not None
    loser = "a" if newest.origin == other.ref else "b"
    assert a.cells[loser].state == "mismatch"
    p = plan([RULE], inv(orig, other), SITES)
    assert loser not in p.copies[0].targets
    assert any(s.site == loser and s.why is SkipReason.MISMATCH for s in p.skips)


def test_mismatch_replace_copies_over_it() -> None:
    rule = TargetRule(pattern="img*", sites=SITES, on_mismatch="replace")
    orig = img("a", t=T0, digest="1")
    other = img("b", t=T0, digest="2")
    _, actions = plan_name("img", rule, inv(orig, other), SITES)
    copy = next(a for a in actions if isinstance(a, Copy))
    assert set(copy.targets) >= {"c", "store"}
    assert len(set(copy.targets) & {"a", "b"}) == 1


def test_min_copies_stays_inside_the_rules_sites_when_one_is_down() -> None:
    # b is down for a moment: the shortfall is reported, and no copy goes to c or store,
    # which the rule does not name (nothing would ever reclaim those copies).
    rule = TargetRule(pattern="img", sites=("a", "b"), min_copies=2)
    orig = img("a")
    _, actions = plan_name("img", rule, inv(orig, down=("b",)), SITES)
    assert not [a for a in actions if isinstance(a, Copy)]
    skip = next(a for a in actions if isinstance(a, Skip) and a.why is SkipReason.MIN_COPIES)
    assert "only 1 sites" in skip.reason


def test_min_copies_counts_only_the_rules_sites() -> None:
    # A current copy on c (not named by the rule) does not count towards redundancy.
    rule = TargetRule(pattern="img", sites=("a", "b"), min_copies=2)
    orig = img("a")
    copy_c = img("c", copy_of=orig.ref, version=T0)
    _, actions = plan_name("img", rule, inv(orig, copy_c, down=("b",)), SITES)
    assert [a.why for a in actions if isinstance(a, Skip)] == [
        SkipReason.UNREACHABLE,
        SkipReason.MIN_COPIES,
    ]
    assert not [a for a in actions if isinstance(a, Copy)]


def test_min_copies_satisfied_needs_nothing_more() -> None:
    rule = TargetRule(pattern="img", sites=("a", "b"), min_copies=2)
    orig = img("a")
    copy_b = img("b", copy_of=orig.ref, version=T0)
    _, actions = plan_name("img", rule, inv(orig, copy_b), SITES)
    assert not [a for a in actions if isinstance(a, Copy | Skip)]


def test_lost_copy_is_copied_again() -> None:
    rule = TargetRule(pattern="img", sites=("a", "b"))
    orig = img("a")
    _, actions = plan_name("img", rule, inv(orig), SITES)
    assert next(a for a in actions if isinstance(a, Copy)).targets == ("b",)


def _versions(site: str, n: int, **kw: object) -> list[ImageRecord]:
    return [
        img(
            site,
            t=T0 + timedelta(days=i),
            digest=str(i + 1),
            copy_of=f"x:{i}",
            version=T0 + timedelta(days=i),
            **kw,  # type: ignore[arg-type]
        )
        for i in range(n)
    ]


def test_keep_two_retires_the_oldest_of_three() -> None:
    rule = TargetRule(pattern="img", sites=("a",), keep=2)
    vs = _versions("a", 3)
    _, actions = plan_name("img", rule, inv(*vs), SITES)
    retires = [a for a in actions if isinstance(a, Retire)]
    assert [r.image_id for r in retires] == [vs[0].id]
    assert retires[0].mode == "hide"


def test_retention_never_touches_protected_or_foreign_or_in_use_images() -> None:
    rule = TargetRule(pattern="img", sites=("a",), keep=1, retire="delete")
    protected = img("a", t=T0, digest="1", copy_of="x:1", protected=True)
    foreign = img("a", t=T0 + timedelta(days=1), digest="2")  # uploaded by a person
    used = img(
        "a", t=T0 + timedelta(days=2), digest="3", copy_of="x:3", version=T0 + timedelta(days=2)
    )
    newest = img(
        "a", t=T0 + timedelta(days=3), digest="4", copy_of="x:4", version=T0 + timedelta(days=3)
    )
    inventories = inv(protected, foreign, used, newest)
    inventories["a"] = dataclasses.replace(inventories["a"], in_use=frozenset({used.id}))
    _, actions = plan_name("img", rule, inventories, SITES)
    assert not [a for a in actions if isinstance(a, Retire)]
    reasons = " ".join(s.reason for s in actions if isinstance(s, Skip))
    assert "protected" in reasons and "not made by imagesync" in reasons
    assert "server uses it" in reasons


def test_retention_waits_until_the_site_is_current() -> None:
    rule = TargetRule(pattern="img", sites=("a", "b"), keep=1)
    old_b = _versions("b", 2)
    newest = img("a", t=T0 + timedelta(days=9), digest="9")
    _, actions = plan_name("img", rule, inv(newest, *old_b), SITES)
    assert not [a for a in actions if isinstance(a, Retire)]  # b is not current yet


def test_push_targets_override_the_rule() -> None:
    orig = img("a")
    _, actions = plan_name("img", RULE, inv(orig), SITES, targets=["c"])
    assert next(a for a in actions if isinstance(a, Copy)).targets == ("c",)


def test_prefer_source_site() -> None:
    orig = img("a")
    copy_b = img("b", copy_of=orig.ref, version=T0)
    _, actions = plan_name("img", RULE, inv(orig, copy_b), SITES, prefer_source="b")
    copy = next(a for a in actions if isinstance(a, Copy))
    assert copy.source_site == "b"


def test_names_without_a_rule_are_ignored() -> None:
    p = plan([TargetRule(pattern="other", sites=SITES)], inv(img("a")), SITES)
    assert p.actions == [] and p.assessments == []


# -- whose images count ----------------------------------------------------------------------
OURS, EVIL = "p-imagesync", "p-someone-else"


def owned(
    *records: ImageRecord, trusted: dict[str, frozenset[str]] | None = None
) -> dict[str, SiteInventory]:
    """``inv`` where clouds a, b and c trust only imagesync's project (the store: everyone)."""
    out = inv(*records)
    for s, owners in (trusted or {s: frozenset({OURS}) for s in ("a", "b", "c")}).items():
        out[s] = dataclasses.replace(out[s], trusted_owners=owners)
    return out


def test_another_projects_newer_image_is_never_a_version_a_source_or_an_answer() -> None:
    ours = img("a", t=T0, digest="1", owner=OURS)
    theirs = img("b", t=T0 + timedelta(hours=1), digest="2", owner=EVIL, visibility="community")
    p = plan([RULE], owned(ours, theirs), SITES)
    (a,) = p.assessments
    assert a.newest is not None and a.newest.origin == ours.ref
    assert a.versions == (a.newest,)  # the foreign image is no version at all
    assert a.cells["b"].state == "missing"  # what check answers from: not the foreign id
    assert a.cells["b"].image is None
    (copy,) = p.copies
    assert (copy.source_site, copy.source_id) == ("a", ours.id)
    assert copy.targets == ("b", "c", "store")
    assert [(i.site, i.image_id, i.owner) for i in a.ignored] == [("b", theirs.id, EVIL)]


def test_only_foreign_images_with_the_name_plan_nothing_but_are_reported() -> None:
    theirs = img("a", digest="2", owner=EVIL, visibility="public")
    p = plan([RULE], owned(theirs), SITES)
    (a,) = p.assessments
    assert a.newest is None and not p.copies and not p.retires
    assert [i.image_id for i in a.ignored] == [theirs.id]


def test_a_foreign_image_is_never_retired_nor_its_uploading_mark_taken_as_ours() -> None:
    rule = TargetRule(pattern="img", sites=("a",), keep=1, retire="delete")
    theirs_old = img("a", t=T0, digest="1", copy_of="x:1", owner=EVIL)
    theirs_hidden = img("a", t=T0, digest="3", copy_of="x:3", owner=EVIL, hidden=True)
    theirs_uploading = img("a", t=T0, digest="4", owner=EVIL, props={PROP_STATE: "uploading"})
    ours = img("a", t=T0 + timedelta(days=1), digest="2", owner=OURS)
    records = (theirs_old, theirs_hidden, theirs_uploading, ours)
    # even if the state database somehow named them: foreign images are not looked at
    inventories = owned(*records)
    inventories["a"] = dataclasses.replace(inventories["a"], made=frozenset(r.id for r in records))
    a, actions = plan_name("img", rule, inventories, SITES)
    assert not [x for x in actions if isinstance(x, Retire)]
    assert a.cells["a"].state == "current"  # not "in-flight" because of their upload
    assert len(a.ignored) == 3


def test_trusted_owners_named_in_the_config_count() -> None:
    partner = img("a", digest="1", owner="p-partner")
    p = plan([RULE], owned(partner, trusted={"a": frozenset({OURS, "p-partner"})}), SITES)
    assert p.assessments[0].newest is not None and not p.assessments[0].ignored


def test_stores_trust_every_image() -> None:
    stored = img("store", digest="1")  # no owner, no trusted_owners: the store is ours
    p = plan([RULE], owned(stored), SITES)
    assert p.assessments[0].newest is not None


# -- snapshots inherit provenance ------------------------------------------------------------
def nova_snapshot(base: ImageRecord, *, t: datetime, digest: str) -> ImageRecord:
    """What Nova makes of a server booted from ``base``: every property of the base image
    (imagesync's marks included), its own marks, its own bytes (so its own os_hash_value)."""
    props = dict(base.properties)
    props.update(
        image_type="snapshot",
        instance_uuid="5e1f8a9c-0000-4000-8000-000000000001",
        base_image_ref=base.id,
    )
    return img(base.site, t=t, digest=digest, props=props)


def test_a_nova_snapshot_of_a_copy_is_a_version_of_its_own_and_the_newest() -> None:
    origin = img("a", t=T0, digest="1")
    copy_b = img("b", t=T0 + timedelta(hours=1), digest="1", copy_of=origin.ref, version=T0)
    snap = nova_snapshot(copy_b, t=T0 + timedelta(days=1), digest="7")
    a = assess("img", inv(origin, copy_b, snap), SITES)
    assert a.newest is not None
    assert a.newest.origin == snap.ref and a.newest.sha512 == sha("7")
    assert len(a.versions) == 2  # the snapshot never joins the version it was booted from
    assert a.cells["b"].image is not None and a.cells["b"].image.id == snap.id
    assert a.cells["a"].state == "stale"


def test_a_snapshot_whose_bytes_match_is_still_not_a_copy() -> None:
    # instance_uuid alone (a backup, or a snapshot nobody changed) makes it Nova's, not ours
    origin = img("a", t=T0, digest="1")
    copy_b = img("b", t=T0 + timedelta(hours=1), digest="1", copy_of=origin.ref, version=T0)
    snap = nova_snapshot(copy_b, t=T0 + timedelta(days=1), digest="1")
    assert snap.version.origin == snap.ref


def test_a_user_snapshot_is_never_retired_when_newer_versions_land() -> None:
    rule = TargetRule(pattern="img", sites=("a", "b"), keep=1, retire="delete")
    origin = img("a", t=T0, digest="1")
    copy_b = img("b", t=T0 + timedelta(hours=1), digest="1", copy_of=origin.ref, version=T0)
    snap = nova_snapshot(copy_b, t=T0 + timedelta(days=1), digest="7")
    newer = img("a", t=T0 + timedelta(days=2), digest="8")
    copy_newer = img(
        "b",
        t=T0 + timedelta(days=2, hours=1),
        digest="8",
        copy_of=newer.ref,
        version=newer.created_at,
    )
    made = frozenset({copy_b.id, copy_newer.id})  # imagesync made these two, not the snapshot
    _, actions = plan_name(
        "img", rule, inv(origin, copy_b, snap, newer, copy_newer, made=made), SITES
    )
    retired = {x.image_id for x in actions if isinstance(x, Retire)}
    assert snap.id not in retired
    assert copy_b.id in retired  # the old copy imagesync made does go
    assert any(
        isinstance(x, Skip) and x.why is SkipReason.NOT_OURS and snap.short_id in x.reason
        for x in actions
    )


def test_a_copy_imagesync_did_not_record_making_is_never_retired() -> None:
    # e.g. made by another imagesync instance, or marks set by hand: kept, and said so
    rule = TargetRule(pattern="img", sites=("a",), keep=1, retire="delete")
    old = img("a", t=T0, digest="1", copy_of="x:1")
    hidden_old = img("a", t=T0, digest="3", copy_of="x:3", hidden=True)
    new = img("a", t=T0 + timedelta(days=1), digest="2", copy_of="x:2", version=T0 + timedelta(1))
    _, actions = plan_name("img", rule, inv(old, hidden_old, new, made=frozenset()), SITES)
    assert not [x for x in actions if isinstance(x, Retire)]
    assert any(isinstance(x, Skip) and x.why is SkipReason.NOT_OURS for x in actions)


# -- newest without trusting the sites' clocks -----------------------------------------------
def test_the_version_imagesync_saw_later_is_newer_whatever_the_clocks_say() -> None:
    seen_early, seen_late = T0 + timedelta(hours=10), T0 + timedelta(hours=11)
    old = img("a", t=T0 + timedelta(hours=2), digest="1").with_(first_seen=seen_early)
    # b's clock is an hour slow: its newer upload claims to be older than a's
    new = img("b", t=T0 + timedelta(hours=1), digest="2").with_(first_seen=seen_late)
    p = plan([RULE], inv(old, new), SITES)
    assert p.assessments[0].newest is not None
    assert p.assessments[0].newest.origin == new.ref
    assert p.copies[0].source_site == "b"


def test_versions_first_seen_together_are_ordered_by_creation_time() -> None:
    seen = T0 + timedelta(hours=10)
    v1 = img("a", t=T0, digest="1").with_(first_seen=seen)
    v2 = img("a", t=T0 + timedelta(minutes=5), digest="2").with_(first_seen=seen)
    a = assess("img", inv(v1, v2), SITES)
    assert a.newest is not None and a.newest.origin == v2.ref
