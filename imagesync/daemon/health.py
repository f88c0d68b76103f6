"""Is the reconcile loop alive? The rule the systemd watchdog is fed by, on an injected clock.

The loop is healthy while the scheduler runs and either a pass in progress has shown a sign of
life (bytes read, an action finished) within ``stall_seconds``, or, between passes, the next
pass is not overdue (``poll_interval + stall_seconds`` since the last one ended). The clock is
passed in (``time.monotonic`` by default) and every other input is an argument, so tests move
time by hand instead of sleeping or writing the daemon's fields.

:func:`feed_watchdog` is the loop of the watchdog thread: it pings while healthy and says
once, not every interval, when it stops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("imagesync.daemon")

#: a pass showing no sign of life for this long is stuck: stop feeding the watchdog
STALL_SECONDS = 900.0

Clock = Callable[[], float]


class Health:
    """Signs of life from the passes, and the verdict drawn from them."""

    def __init__(
        self, stall_seconds: float = STALL_SECONDS, *, clock: Clock = time.monotonic
    ) -> None:
        self.stall_seconds = stall_seconds
        self.clock = clock
        now = clock()
        self.last_beat = now  # the running pass's latest sign of life
        self.last_pass_end = now  # a fresh daemon counts as having just finished a pass

    def beat(self) -> None:
        """A sign of life from the running pass."""
        self.last_beat = self.clock()

    def pass_ended(self) -> None:
        self.last_pass_end = self.clock()

    def healthy(self, *, scheduler_running: bool, pass_running: bool, poll_interval: float) -> bool:
        if not scheduler_running:
            return False
        now = self.clock()
        if pass_running:
            return now - self.last_beat < self.stall_seconds
        return now - self.last_pass_end < poll_interval + self.stall_seconds


def feed_watchdog(
    interval: float, done: threading.Event, healthy: Callable[[], bool], ping: Callable[[], Any]
) -> None:
    """Every ``interval`` until ``done``: ``ping()`` if ``healthy()``; complain once if not."""
    complained = False
    while not done.wait(interval):
        if healthy():
            ping()
            complained = False
        elif not complained:
            log.error(
                "watchdog.unhealthy",
                reason="no sign of life from the reconcile "
                "loop: no longer feeding the systemd watchdog",
            )
            complained = True
