"""A small progress bar for interactive transfers (stderr, only on a terminal), and the units
people read: sizes (``human_bytes``), rates and durations, the same in the bar, the summary
``push`` prints after it, and ``history``.

Site code knows nothing of it: the transfer engine calls a byte-count callback (rclone's
accounting lesson) and the CLI decides whether that draws a bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

#: what the bar says when Ctrl-C (or SIGTERM) stopped its copy: the transfer code aborts every
#: upload it had open before the interrupt reaches the bar
INTERRUPTED = "interrupted: the uploads it had started were removed"


def human_bytes(n: float) -> str:
    """1536 → "1.5 KiB": binary units, as `ls -h` and Glance's sizes in GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns at TiB


def human_rate(nbytes: float, seconds: float) -> str:
    """Bytes over seconds in the units of :func:`human_bytes`, per second ("85.3 MiB/s")."""
    return f"{human_bytes(nbytes / seconds if seconds > 0 else 0.0)}/s"


def clock_time(seconds: float) -> str:
    """A duration as a clock reads: "0:42", "12:05", "1:02:03"."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def human_seconds(seconds: float) -> str:
    """A copy's duration: "4.2 s" under a minute, else as a clock reads ("12:05")."""
    return f"{seconds:.1f} s" if seconds < 59.95 else clock_time(seconds)


class ProgressBar:
    """Counts bytes and redraws at most ~10 times a second: done, total, rate and ETA."""

    def __init__(
        self,
        label: str,
        total: int | None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = 0
        self.start = clock()
        self._last = float("-inf")
        self._width = 0  # of the last line drawn: a shorter one must cover it

    def __call__(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self._last >= 0.1:
            self._last = now
            self._draw(now)

    def text(self, now: float) -> str:
        """The line as it reads at ``now``."""
        elapsed = now - self.start
        rate = human_rate(self.done, elapsed)
        if not self.total:
            return f"{self.label} {human_bytes(self.done)} {rate}"
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        if self.done >= self.total:
            eta = f"in {clock_time(elapsed)}"
        elif self.done and elapsed > 0:
            eta = f"ETA {clock_time((self.total - self.done) * elapsed / self.done)}"
        else:
            eta = "ETA --:--"
        return (
            f"{self.label} [{bar:<30}] {frac * 100:5.1f}% "
            f"{human_bytes(self.done)}/{human_bytes(self.total)} {rate} {eta}"
        )

    def _draw(self, now: float) -> None:
        text = self.text(now)
        self.stream.write("\r" + text.ljust(self._width))
        self._width = len(text)
        self.stream.flush()

    def close(self, *, interrupted: bool = False) -> None:
        """Draw the last state and end the line; after Ctrl-C, say what became of the uploads."""
        self._draw(self.clock())
        self.stream.write("\n")
        if interrupted:
            self.stream.write(f"{self.label}: {INTERRUPTED}\n")
        self.stream.flush()


def wants_progress(stream: TextIO | None = None) -> bool:
    return (stream or sys.stderr).isatty()
