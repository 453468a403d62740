"""Warnings a flood of bad input would repeat: said at most once per interval."""

from __future__ import annotations

import time


class LogThrottle:
    """``ready()`` is true at most once every ``interval_s`` seconds (the caller then logs,
    with its running count, so nothing is lost but repetition)."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last > self.interval_s:
            self._last = now
            return True
        return False
