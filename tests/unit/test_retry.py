"""The shared retry policy: backoff with jitter, Retry-After honoured, gives up clearly."""

from __future__ import annotations

import pytest

from imagesync.errors import NotFound, TransientError
from imagesync.retry import RetryPolicy, call_with_retry


def test_retries_transient_errors_then_succeeds() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("503", retry_after=7.0 if len(calls) == 1 else None)
        return "ok"

    assert (
        call_with_retry(
            flaky, RetryPolicy(attempts=4, base=1, cap=4), what="x", sleep=sleeps.append
        )
        == "ok"
    )
    assert len(calls) == 3
    assert sleeps[0] == 7.0  # the server's Retry-After
    assert 0 <= sleeps[1] <= 2  # jittered backoff: uniform(0, base * 2)


def test_gives_up_with_a_clear_error() -> None:
    def down() -> None:
        raise TransientError("connection refused", site="c1")

    with pytest.raises(TransientError, match="gave up after 3 tries"):
        call_with_retry(down, RetryPolicy(attempts=3), what="list c1", sleep=lambda s: None)


def test_non_transient_errors_are_not_retried() -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        raise NotFound("no such image")

    with pytest.raises(NotFound):
        call_with_retry(missing, RetryPolicy(attempts=5), what="get", sleep=lambda s: None)
    assert len(calls) == 1


def test_retry_after_is_capped() -> None:
    assert RetryPolicy(max_retry_after=60).delay(1, retry_after=3600) == 60
    assert all(0 <= RetryPolicy(base=1, cap=5).delay(10) <= 5 for _ in range(50))
