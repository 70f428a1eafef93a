"""Supervision of one worker: when to restart it, and when to stop trying (a circuit breaker)."""

from __future__ import annotations

import time

from . import Placement

__all__ = ["Supervisor"]


class Supervisor:
    """Counts crashes and says how long to wait before the next start, or that none may follow.

    Restarts are immediate after a first crash, then back off exponentially; ``max_crashes``
    crashes inside ``crash_window`` seconds open the circuit for good (health reports it).
    """

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.crashes: list[float] = []
        self.total_crashes = 0
        self.last_error = ""
        self.open = False
        self.restarts = 0

    def crashed(self, reason: str) -> None:
        now = time.monotonic()
        window = self.placement.crash_window
        self.crashes = [t for t in self.crashes if now - t < window] + [now]
        self.total_crashes += 1
        self.last_error = reason
        if len(self.crashes) >= self.placement.max_crashes:
            self.open = True

    def delay(self) -> float:
        """Seconds still to wait before the worker may start again (0 when it may start now)."""
        recent = len(self.crashes)
        if recent <= 1:
            return 0.0
        placement = self.placement
        wait: float = min(placement.restart_backoff * 2 ** (recent - 2), placement.restart_backoff_max)
        return max(0.0, self.crashes[-1] + wait - time.monotonic())

    def describe(self) -> str:
        if self.open:
            return (f"circuit open: {len(self.crashes)} crashes within {self.placement.crash_window:g} s, "
                    f"no more restarts; last: {self.last_error}")
        return f"{self.total_crashes} crash(es), {self.restarts} restart(s); last: {self.last_error}"
