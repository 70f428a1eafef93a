"""Per-key admission: a token bucket for request rate, a counter for unfinished tasks."""

from __future__ import annotations

import time

__all__ = ["InFlight", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; each request takes one.

    :meth:`take` returns 0.0 when the request may go ahead, else the seconds until a token is due
    (the ``Retry-After``). Not thread-safe: the gateway uses it on its event loop only.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, not {rate}")
        self.rate = rate
        self.burst = burst if burst >= 1 else max(1.0, rate)
        self._tokens = self.burst
        self._stamp = time.monotonic()

    def take(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self.rate


class InFlight:
    """How many unfinished tasks each key has, against its cap."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def try_add(self, key: str, cap: int) -> bool:
        count = self._counts.get(key, 0)
        if cap and count >= cap:
            return False
        self._counts[key] = count + 1
        return True

    def remove(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)
