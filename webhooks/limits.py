"""Per-source rate limits (token buckets) so one noisy sender cannot starve the others.

A source is (route group, client address). Behind a reverse proxy every request shares the
proxy's address, so the limit then acts per provider, which is still the protection we want:
a runaway retry storm from one provider cannot take the others' capacity.
"""

from __future__ import annotations

import time

from engine.ratelimit import RateLimit, TokenBucket

DEFAULT_RATE_LIMIT = RateLimit(rate=500.0, burst=1000.0)


class RateLimiter:
    """Token buckets keyed by source; idle buckets are forgotten so memory stays bounded."""

    def __init__(self, limit: RateLimit, *, max_sources: int = 10_000) -> None:
        self.limit = limit
        self.max_sources = max_sources
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def allow(self, group: str, source: str, now: float | None = None) -> bool:
        moment = time.monotonic() if now is None else now
        key = (group, source)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._forget_idle(moment)
            bucket = self._buckets[key] = TokenBucket(self.limit, moment)
        return bucket.take(moment)

    def retry_after(self) -> int:
        return max(1, int(1 / self.limit.rate + 0.999))

    def _forget_idle(self, moment: float) -> None:
        full_after = self.limit.burst / self.limit.rate
        for key in [k for k, bucket in self._buckets.items() if moment - bucket.at > full_after]:
            del self._buckets[key]
        if len(self._buckets) >= self.max_sources:  # still full: a flood of distinct sources
            self._buckets.clear()
