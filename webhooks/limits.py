"""Who a request comes from, and a limit on the requests each source gets refused.

What is limited: refusals (a failed signature, a malformed or oversized body), never signed
deliveries. Why: a provider's retry storm is legitimate traffic that must be stored, while
unsigned floods are what the limit is for; keyed on every request and applied before the
signature, it answered real Twilio deliveries 429 whenever an attacker shared their address.
A source whose refusals used up its bucket is answered 429 before its body is read.

Who the source is: the connecting address, or, when that address is one of
``server.trusted_proxies``, the rightmost ``X-Forwarded-For`` entry that is not itself a
trusted proxy (what the proxy saw). Behind an untrusted proxy every request shares the
proxy's address, so the limit then acts per route group, as before.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable

from aiohttp import web

from engine.ratelimit import RateLimit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


DEFAULT_RATE_LIMIT = RateLimit(rate=20.0, burst=100.0)


class RateLimiter:
    """Token buckets keyed by (route group, source); idle buckets are forgotten so memory
    stays bounded."""

    def __init__(self, limit: RateLimit, *, max_sources: int = 10_000) -> None:
        self.limit = limit
        self.max_sources = max_sources
        self._buckets: dict[tuple[str, str], list[float]] = {}

    def exhausted(self, group: str, source: str, now: float | None = None) -> bool:
        """True while ``source`` has no refusals left in ``group``."""
        bucket = self._buckets.get((group, source))
        if bucket is None:
            return False
        moment = time.monotonic() if now is None else now
        return self._refill(bucket, moment) < 1.0

    def charge(self, group: str, source: str, cost: float = 1.0, now: float | None = None) -> None:
        """Count a refusal against ``source``: ``cost`` is 1 plus the MiB it made us read
        (``refusal_cost``), so a refused 29 MiB body weighs as much as 30 refused forms."""
        moment = time.monotonic() if now is None else now
        key = (group, source)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._forget_idle(moment)
            bucket = self._buckets[key] = [self.limit.burst, moment]
        bucket[0] = max(0.0, self._refill(bucket, moment) - cost)
        bucket[1] = moment

    def _refill(self, bucket: list[float], moment: float) -> float:
        return min(self.limit.burst, bucket[0] + (moment - bucket[1]) * self.limit.rate)

    def retry_after(self) -> int:
        return max(1, int(1 / self.limit.rate + 0.999))

    def _forget_idle(self, moment: float) -> None:
        full_after = self.limit.burst / self.limit.rate
        for key in [k for k, bucket in self._buckets.items() if moment - bucket[1] > full_after]:
            del self._buckets[key]
        if len(self._buckets) >= self.max_sources:  # still full: a flood of distinct sources
            self._buckets.clear()


def refusal_cost(request: web.Request) -> float:
    """1 per refused request, plus 1 per MiB of body it declared (what reading it cost)."""
    return 1.0 + (request.content_length or 0) / (1024 * 1024)


class LogThrottle:
    """At most ``per_s`` lines a second from one noisy place (e.g. each refused request), so
    a flood cannot turn into a flood of log lines; says how many it held back."""

    def __init__(self, per_s: float = 5.0) -> None:
        self.per_s = per_s
        self._allowance = per_s
        self._last = time.monotonic()
        self.held_back = 0

    def allow(self) -> int | None:
        """None: stay quiet; else log now, mentioning the returned number of lines held back."""
        now = time.monotonic()
        self._allowance = min(self.per_s, self._allowance + (now - self._last) * self.per_s)
        self._last = now
        if self._allowance < 1.0:
            self.held_back += 1
            return None
        self._allowance -= 1.0
        held, self.held_back = self.held_back, 0
        return held


def networks(items: Iterable[str]) -> tuple[Network, ...]:
    """``server.trusted_proxies`` parsed (the settings have validated them)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def client_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """The request's source: see the module docstring."""
    remote = request.remote or "?"
    if not trusted or not _within(remote, trusted):
        return remote
    hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", []) for hop in header.split(",")]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop if _parses(hop) else remote
    return remote


def _within(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def _parses(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
