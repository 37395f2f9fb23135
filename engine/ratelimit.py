"""Token buckets: a sustained rate with a burst allowance.

One bucket per thing being limited (a Twilio stream's messages, a supervisor's commands, a
webhook source's requests). Single-threaded: each bucket is used from one event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    rate: float
    """Sustained events per second."""
    burst: float
    """Events allowed at once before the rate applies."""


class TokenBucket:
    """Starts full; each event takes one token; tokens come back at ``limit.rate``."""

    __slots__ = ("limit", "tokens", "at")

    def __init__(self, limit: RateLimit, now: float | None = None) -> None:
        self.limit = limit
        self.tokens = limit.burst
        self.at = time.monotonic() if now is None else now
        """When the bucket was last used (``time.monotonic()``)."""

    def take(self, now: float | None = None) -> bool:
        """Take one token: True if there was one, False when the limit is reached."""
        moment = time.monotonic() if now is None else now
        tokens = min(self.limit.burst, self.tokens + (moment - self.at) * self.limit.rate)
        self.at = moment
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True
