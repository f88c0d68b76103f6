"""The planner's boot-test decisions (pure): a newest version that has not passed its rule's
boot test goes to the boot test's cloud only (hidden), everything else of its name waits
(copies and retention); a version that passed spreads; a quarantined version is no version,
wherever its original stays visible."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from imagesync.model import PROP_BOOT_TEST, PROP_QUARANTINED, ImageRecord
from imagesync.plan import (
    BOOT_TEST_PENDING,
    Copy,
    Retire,
    Skip,
    SkipReason,
    TargetRule,
    plan,
    plan_name,
)
from tests.unit.test_plan import SITES, T0, img, inv


@dataclass(frozen=True)
class OnA:
    cloud: str = "a"


RULE = TargetRule(pattern="img*", sites=("a", "b", "c", "store"), keep=1, boot_test=OnA())
LATER = T0 + timedelta(hours=1)


def _v1_everywhere() -> list[ImageRecord]:
    """The previous good version: its original on a, copies imagesync made elsewhere."""
    v1 = img("a", digest="1", props={PROP_BOOT_TEST: "passed 2026-01-01T00:00:00Z"})
    return [v1, *(img(s, digest="1", copy_of=f"a:{v1.id}") for s in ("b", "c", "store"))]


def _copy_on_a(v2: ImageRecord, props: dict[str, str], *, hidden: bool = True) -> ImageRecord:
    """imagesync's copy of ``v2`` on the boot test's cloud ``a``, with ``props``."""
    return img("a", digest="2", t=LATER, copy_of=f"b:{v2.id}", hidden=hidden, props=props)


def _plan(*records: ImageRecord) -> tuple[list[Copy], list[Retire], list[Skip]]:
    p = plan([RULE], inv(*records), SITES)
    return p.copies, p.retires, p.skips


def test_a_version_first_seen_elsewhere_goes_to_the_boot_test_cloud_only_hidden() -> None:
    v2 = img("b", digest="2", t=LATER)
    copies, retires, skips = _plan(*_v1_everywhere(), v2)
    (copy,) = copies
    assert copy.targets == ("a",) and copy.hidden and copy.source_id == v2.id
    assert retires == []  # v1 on b is beyond keep=1, but nothing retires before the test
    assert {(s.site, s.why) for s in skips} == {
        ("c", SkipReason.BOOT_TEST),
        ("store", SkipReason.BOOT_TEST),
    }


def test_while_the_hidden_copy_waits_for_its_boot_nothing_moves() -> None:
    v2 = img("b", digest="2", t=LATER)
    held = _copy_on_a(v2, {PROP_BOOT_TEST: BOOT_TEST_PENDING})
    copies, retires, skips = _plan(*_v1_everywhere(), v2, held)
    assert copies == [] and retires == []
    assert all(s.why is SkipReason.BOOT_TEST and "booting" in s.reason for s in skips)
    # even a test copy left visible (its hide failed) does not count as the version spread
    copies, retires, _ = _plan(*_v1_everywhere(), v2, held.with_(hidden=False))
    assert copies == [] and retires == []


def test_a_version_that_passed_spreads_and_retention_resumes() -> None:
    v2 = img("b", digest="2", t=LATER)
    passed = _copy_on_a(v2, {PROP_BOOT_TEST: "passed now"}, hidden=False)
    copies, retires, _ = _plan(*_v1_everywhere(), v2, passed)
    (copy,) = copies
    assert set(copy.targets) == {"c", "store"} and not copy.hidden
    assert {r.site for r in retires} == {"b"}  # where v2 is current and v1 is imagesync's copy


def test_a_quarantined_version_is_no_version_while_its_original_stays_visible() -> None:
    old = _v1_everywhere()
    v2 = img("b", digest="2", t=LATER)
    bad = _copy_on_a(v2, {PROP_QUARANTINED: "boot test on a failed"})
    p = plan([RULE], inv(*old, v2, bad), SITES)
    assert p.copies == [] and p.retires == [] and p.skips == []
    (a,) = p.assessments
    assert a.newest is not None and a.newest.origin == f"a:{old[0].id}"
    assert [q.origin for q in a.quarantined] == [f"b:{v2.id}"]
    # check answers the previous good version everywhere, on b (the user's upload) too
    assert {s: c.image.id for s, c in a.cells.items() if c.image} == {r.site: r.id for r in old}


def test_an_original_on_the_boot_test_cloud_is_held_until_it_is_booted() -> None:
    v2 = img("a", digest="2", t=LATER)
    copies, retires, skips = _plan(*_v1_everywhere(), v2)
    assert copies == [] and retires == []
    assert {s.site for s in skips} == {"b", "c", "store"}


def test_a_version_spread_before_the_rule_asked_for_a_test_is_not_held() -> None:
    v2 = img("b", digest="2", t=LATER)
    spread = img("c", digest="2", t=LATER, copy_of=f"b:{v2.id}")
    (copy,) = _plan(*_v1_everywhere(), v2, spread)[0]
    assert set(copy.targets) == {"a", "store"} and not copy.hidden


def test_an_unreachable_boot_test_cloud_holds_the_version_everywhere() -> None:
    v2 = img("b", digest="2", t=LATER)
    p = plan([RULE], inv(*_v1_everywhere(), v2, down=("a",)), SITES)
    assert p.copies == [] and p.retires == []
    assert {s.site for s in p.skips} == {"c", "store"}
    assert all(s.why is SkipReason.BOOT_TEST and "unreachable" in s.reason for s in p.skips)


def test_rules_without_a_boot_test_are_unchanged() -> None:
    v2 = img("b", digest="2", t=LATER)
    rule = TargetRule(pattern="img*", sites=("a", "b", "c", "store"))
    (copy,) = plan([rule], inv(*_v1_everywhere(), v2), SITES).copies
    assert set(copy.targets) == {"a", "c", "store"} and not copy.hidden


def test_explicit_targets_wait_for_the_boot_test_too() -> None:
    """``push --to c`` or ``check --ensure --cloud c``: the version still goes to the boot
    test's cloud first, never straight to c."""
    v2 = img("b", digest="2", t=LATER)
    _, actions = plan_name("img", RULE, inv(*_v1_everywhere(), v2), SITES, targets=["c"])
    copies = [a for a in actions if isinstance(a, Copy)]
    assert [(c.targets, c.hidden) for c in copies] == [(("a",), True)]
    assert [(a.site, a.why) for a in actions if isinstance(a, Skip)] == [
        ("c", SkipReason.BOOT_TEST)
    ]


def test_a_version_first_seen_in_the_store_also_goes_to_the_boot_test_cloud_first() -> None:
    v2 = img("store", digest="2", t=LATER)
    copies, retires, skips = _plan(*_v1_everywhere(), v2)
    assert [(c.source_site, c.targets, c.hidden) for c in copies] == [("store", ("a",), True)]
    assert retires == [] and {s.site for s in skips} == {"b", "c"}
