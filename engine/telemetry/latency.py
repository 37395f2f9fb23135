"""Latency histograms: cheap enough to observe every frame, exact enough to report p99.

Two views of the same samples, because two readers want different things:
- cumulative buckets, count and sum, the Prometheus histogram shape ``/metrics`` exports;
- a ring of the most recent samples, for exact percentiles over a recent window (the TUI,
  the call summary written at hang-up, benchmarks).

``observe`` is a few list operations (no numpy, no lock): it runs on the runtime loop for
every frame of every call. Readers on other threads may see a sample torn between the two
views, which only ever shifts a percentile by one sample.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

DEFAULT_BUCKETS_MS: tuple[float, ...] = (
    1,
    2,
    5,
    10,
    15,
    20,
    25,
    30,
    40,
    50,
    60,
    80,
    100,
    150,
    200,
    300,
    500,
    1000,
    2000,
)


class Histogram:
    """Millisecond samples: Prometheus-style buckets plus a ring for percentiles."""

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS_MS, window: int = 4096) -> None:
        self.buckets = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # last one is +Inf
        self.count = 0
        self.sum = 0.0
        self.max = 0.0
        self._ring = [0.0] * window
        self._window = window

    def observe(self, ms: float) -> None:
        self._counts[bisect_left(self.buckets, ms)] += 1
        self._ring[self.count % self._window] = ms
        self.count += 1
        self.sum += ms
        if ms > self.max:
            self.max = ms

    def recent(self) -> np.ndarray:
        """The samples still in the window (unordered)."""
        return np.asarray(self._ring[: min(self.count, self._window)], dtype=np.float64)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) of the recent window, or None before any sample."""
        samples = self.recent()
        return float(np.percentile(samples, q)) if samples.size else None

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        samples = self.recent()
        if not samples.size:
            return {f"p{q:g}": None for q in qs}
        values = np.percentile(samples, qs)
        return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, values, strict=True)}

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """[(upper bound, samples <= bound)], ending with (inf, count): Prometheus ``_bucket``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self._counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def summary(self) -> dict[str, float | int | None]:
        """JSON-able figures for health pages, reports and benchmarks."""
        return {
            "count": self.count,
            "mean": None if self.mean is None else round(self.mean, 3),
            "max": round(self.max, 3),
            **self.percentiles(50, 90, 99),
        }
