"""Per-source rate limits (token buckets) so one noisy sender cannot starve the others.

A source is (route group, client address). Behind a reverse proxy every request shares the
proxy's address, so the limit then acts per provider, which is still the protection we want:
a runaway retry storm from one provider cannot take the others' capacity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    rate: float
    """Sustained requests per second per source."""
    burst: float
    """Requests a source may send at once before the rate applies."""


DEFAULT_RATE_LIMIT = RateLimit(rate=500.0, burst=1000.0)


class RateLimiter:
    """Token buckets keyed by source; idle buckets are forgotten so memory stays bounded."""

    def __init__(self, limit: RateLimit, *, max_sources: int = 10_000) -> None:
        self.limit = limit
        self.max_sources = max_sources
        self._buckets: dict[tuple[str, str], list[float]] = {}

    def allow(self, group: str, source: str, now: float | None = None) -> bool:
        moment = time.monotonic() if now is None else now
        key = (group, source)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._forget_idle(moment)
            bucket = self._buckets[key] = [self.limit.burst, moment]
        tokens = min(self.limit.burst, bucket[0] + (moment - bucket[1]) * self.limit.rate)
        bucket[1] = moment
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def retry_after(self) -> int:
        return max(1, int(1 / self.limit.rate + 0.999))

    def _forget_idle(self, moment: float) -> None:
        full_after = self.limit.burst / self.limit.rate
        for key in [k for k, (_, seen) in self._buckets.items() if moment - seen > full_after]:
            del self._buckets[key]
        if len(self._buckets) >= self.max_sources:  # still full: a flood of distinct sources
            self._buckets.clear()
