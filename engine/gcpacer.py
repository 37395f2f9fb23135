"""Full garbage collections at a harmless moment: right after a tick.

Why: CPython's automatic full (generation 2) collection stops every thread of the process,
with the console and many calls in one process for long enough that the bridge misses
reading the audio the next tick needs: late frames, in bursts across every call
(docs/performance.md, "Runtime and console"). A tick leaves an idle stretch once its
outputs are sent (the next tick is up to 80 ms away), so the runtime turns automatic full
collections off and runs one there instead, at most every ``every_s``. Young collections
(generations 0 and 1, a few ms) stay automatic.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

NEVER = 1_000_000_000
"""A generation-2 threshold no process reaches: CPython never starts a full pass by itself."""


class GcPacer:
    """Owns the process's full collections while installed."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self.collections = 0
        self.last_pause_ms: float | None = None
        self._last = clock()
        self._saved: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Stop automatic full collections (process-wide) until ``uninstall``."""
        if self._saved is None:
            self._saved = gc.get_threshold()
            gen0, gen1, _ = self._saved
            gc.set_threshold(gen0, gen1, NEVER)

    def uninstall(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def after_tick(self) -> None:
        """Called once a tick's outputs are out: run the full pass if one is due."""
        now = self.clock()
        if now - self._last < self.every_s:
            return
        started = time.perf_counter()
        gc.collect()
        self.last_pause_ms = (time.perf_counter() - started) * 1000
        self.collections += 1
        self._last = self.clock()
