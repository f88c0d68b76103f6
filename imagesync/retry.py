"""The one retry policy: exponential backoff with full jitter, honouring Retry-After.

Sites only classify failures (``TransientError`` vs the rest); this module alone decides
whether and when to try again, and how long to wait: ``call_with_retry`` for one call, and
``RetryPolicy.pause`` for loops that retry more than one thing at once (a copy re-sends only
the targets that failed, from a fresh read of the source).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from imagesync.errors import TransientError

T = TypeVar("T")
log = structlog.get_logger("imagesync.retry")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # total tries, the first included
    base: float = 0.5  # seconds
    cap: float = 30.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try number ``attempt + 1`` (attempt counts from 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return random.uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))

    def pause(
        self,
        attempt: int,
        retry_after: float | None = None,
        *,
        what: str,
        sleep: Callable[[float], None] = time.sleep,
        cancel: threading.Event | None = None,
        **context: object,
    ) -> bool:
        """Wait before try ``attempt + 1``; False when ``cancel`` was set meanwhile."""
        wait = self.delay(attempt, retry_after)
        log.warning("retrying", what=what, attempt=attempt, wait=round(wait, 2), **context)
        if cancel is not None:
            return not cancel.wait(wait)
        sleep(wait)
        return True


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[TransientError], None] | None = None,
) -> T:
    """Call ``fn``; on TransientError wait and try again, up to ``policy.attempts`` tries."""
    attempt = 1
    while True:
        try:
            return fn()
        except TransientError as exc:
            if attempt >= policy.attempts:
                raise TransientError(
                    f"{what}: gave up after {attempt} tries: {exc}", retry_after=None
                ) from exc
            if on_retry is not None:
                on_retry(exc)
            policy.pause(attempt, exc.retry_after, what=what, sleep=sleep, error=str(exc))
            attempt += 1
