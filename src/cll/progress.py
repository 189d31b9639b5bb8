"""Progress lines for long work (certify, audit): what is done, the rate and the time left, at most
one line every ``every`` seconds, so a user can tell progress from a hang."""

from __future__ import annotations

import time
from collections.abc import Callable


def fmt_time(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``update(k)`` after each k units of work; a line goes to ``log`` (None: nowhere) when ``every``
    seconds passed since the last one: "certify: 3000/10000 images, 512 images/s, ETA 14s"."""

    def __init__(self, what: str, total: int | None, unit: str, log: Callable[[str], None] | None, every: float = 10.0):
        self.what, self.total, self.unit, self.log, self.every = what, total, unit, log, every
        self.done = 0
        self.start = self.last = time.time()

    def update(self, count: int) -> None:
        self.done += count
        now = time.time()
        if self.log is None or now - self.last < self.every:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        eta = f", ETA {fmt_time((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
        self.log(f"{self.what}: {self.done}{of} {self.unit}, {rate:.3g} {self.unit}/s{eta}")
