"""The pure planner: version choice, placement, redundancy, mismatch, retention. No clients."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from imagesync.model import (
    PROP_ORIGIN,
    PROP_SHA512,
    PROP_STATE,
    PROP_VERSION,
    ImageRecord,
    SiteInventory,
    format_time,
)
from imagesync.plan import Copy, Retire, Skip, SkipReason, TargetRule, assess, plan, plan_name

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
        props.update(
            {
                PROP_ORIGIN: copy_of,
                PROP_VERSION: format_time(version or t),
                PROP_SHA512: sha(digest),
            }
        )
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


def inv(*records: ImageRecord, down: tuple[str, ...] = ()) -> dict[str, SiteInventory]:
    out = {s: SiteInventory(s, tuple(r for r in records if r.site == s)) for s in SITES}
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
    inventories["a"] = SiteInventory("a", inventories["a"].images, in_use=frozenset({used.id}))
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
