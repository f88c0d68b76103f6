"""A small progress bar for interactive transfers (stderr, only on a terminal).

Site code knows nothing of it: the transfer engine calls a byte-count callback (rclone's
accounting lesson) and the CLI decides whether that draws a bar.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    """Counts bytes and redraws at most ~10 times a second."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-6)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = (
                f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% "
                f"{human_bytes(self.done)}/{human_bytes(self.total)} "
                f"{human_bytes(rate)}/s"
            )
        else:
            text = f"\r{self.label} {human_bytes(self.done)} {human_bytes(rate)}/s"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


def wants_progress(stream: TextIO | None = None) -> bool:
    return (stream or sys.stderr).isatty()
