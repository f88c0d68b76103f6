"""The one fake clock of the unit tests: it moves only when the test (or a fake sleep) says so.

Pass the instance where code takes a ``Callable[[], float]`` clock, and ``clock.sleep`` where
it takes a sleep; ``sleeps`` counts the sleeps, so a test asserts on how often the code under
test waited, never on wall-clock time.
"""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds
