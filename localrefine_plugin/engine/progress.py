"""Progress lines for long loops: particles done / total, rate, time left.

One log line per batch (``logging``, never ``print``), so a progress "bar" also
reads well in a log file and under Scipion, which captures stderr.
"""

from __future__ import annotations

import logging
import time

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``3725.0`` -> ``"1h02m05s"``; ``65`` -> ``"1m05s"``; ``7.2`` -> ``"7s"``."""
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class Progress:
    """Counts work units and logs ``label: done/total (pct) [bar], rate, time left``.

    Parameters
    ----------
    total : int
        Units of work (particles) expected.
    label : str
        Prefix of each line, e.g. ``"iteration 2"``.
    logger : logging.Logger
        Where the lines go (INFO).
    unit : str
        Name of a unit, plural, for the rate (``"particles/s"``).
    clock : callable
        Seconds, monotonic (injectable for tests).
    """

    width = 20

    def __init__(
        self,
        total: int,
        label: str,
        logger: logging.Logger,
        *,
        unit: str = "particles",
        clock=time.monotonic,
    ) -> None:
        self.total = int(total)
        self.label = label
        self.logger = logger
        self.unit = unit
        self.clock = clock
        self.start = clock()
        self.done = 0

    def update(self, n: int) -> str:
        """Record ``n`` more units done; log and return the progress line."""
        self.done += int(n)
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({100 * frac:3.0f}%) "
            f"[{bar}] {rate:.1f} {self.unit}/s, {format_seconds(left)} left"
        )
        self.logger.info(line)
        return line
