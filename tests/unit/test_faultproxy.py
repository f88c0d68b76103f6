"""The fault proxy's counted faults: each is used once per request it applies to, then spent.

The proxy itself runs in front of real Glance in the integration tests; what a plan decides
(which request fails, loses its answer, or has its connection cut) is plain bookkeeping,
checked here without sockets.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.faultproxy import FaultPlan


@pytest.mark.parametrize(
    ("take", "budget", "methods", "counter"),
    [
        pytest.param(FaultPlan.take_failure, "fail_requests", "fail_methods", "failed", id="fail"),
        pytest.param(FaultPlan.take_loss, "lose_responses", "lose_methods", "lost", id="lose"),
    ],
)
def test_a_counted_fault_applies_to_its_methods_until_spent(
    take: Callable[[FaultPlan, str], bool], budget: str, methods: str, counter: str
) -> None:
    plan = FaultPlan(**{budget: 2, methods: ("PATCH",)})  # type: ignore[arg-type]
    assert [take(plan, m) for m in ("GET", "PATCH", "DELETE", "PATCH", "PATCH")] == [
        False,
        True,
        False,
        True,
        False,
    ]
    assert (getattr(plan, budget), getattr(plan, counter)) == (0, 2)


def test_a_counted_fault_with_no_methods_applies_to_any() -> None:
    plan = FaultPlan(fail_requests=1)
    assert plan.take_failure("GET")
    assert not plan.take_failure("GET")
    assert plan.failed == 1


@pytest.mark.parametrize(
    ("kind", "fields", "times"),
    [
        pytest.param("PUT-up", {"cut_upload_after": 100, "cut_times": 2}, "cut_times", id="up"),
        pytest.param(
            "GET-down",
            {"cut_download_after": 100, "cut_download_times": 2},
            "cut_download_times",
            id="down",
        ),
    ],
)
def test_a_cut_comes_past_its_offset_on_its_own_direction_only(
    kind: str, fields: dict[str, int], times: str
) -> None:
    plan = FaultPlan(**fields)  # type: ignore[arg-type]
    other = "GET-down" if kind == "PUT-up" else "PUT-up"
    assert not plan.take_cut(kind, 100)  # not past the offset yet
    assert not plan.take_cut(other, 1000)  # the other direction is not cut
    assert not plan.take_cut("", 1000)  # nor a body that is not image data
    assert plan.take_cut(kind, 101)
    assert plan.take_cut(kind, 5000)
    assert not plan.take_cut(kind, 5000)  # spent
    assert (getattr(plan, times), plan.cuts) == (0, 2)
