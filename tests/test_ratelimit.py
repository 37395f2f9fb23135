"""The one token bucket behind the bridge's flood check, supervisor commands and webhook sources."""

from __future__ import annotations

from engine.ratelimit import RateLimit, TokenBucket


def test_burst_then_the_sustained_rate() -> None:
    bucket = TokenBucket(RateLimit(rate=10.0, burst=3.0), now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False  # half a token back
    assert bucket.take(0.1) is True  # a whole one
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]  # never more than the burst
