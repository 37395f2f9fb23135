"""CPU, RAM and GPU figures as ``SystemSampled`` events, once per interval, on a small thread.

Why a thread and not the runtime loop: NVML calls and psutil's /proc reads block for a few
milliseconds, and the runtime loop carries the 80 ms tick. The sampler re-arms after each
sample (a slow NVML call delays the next sample instead of piling samples up).

Only measured values go out: a GPU figure NVML cannot read is None, and with no GPU the event
carries the reason (``gpu_reason``) so the console can say it plainly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psutil

from engine.events import Event, SystemSampled
from engine.telemetry import gpu

log = logging.getLogger("xswarm.telemetry")


def sample() -> SystemSampled:
    """One measurement of this machine (CPU % since the previous call; the first call reads 0)."""
    memory = psutil.virtual_memory()
    found = gpu.probe()
    return SystemSampled(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        ram_used_bytes=int(memory.total - memory.available),
        ram_total_bytes=int(memory.total),
        gpus=[
            {
                "name": g.name,
                "util_percent": g.util_percent,
                "mem_used": g.memory_used,
                "mem_total": g.memory_total,
                "temp_c": g.temp_c,
                "power_w": g.power_w,
            }
            for g in found.gpus
        ],
        gpu_reason=found.reason,
    )


class SystemSampler:
    """Publishes ``sample()`` every ``interval_s`` until ``stop()``."""

    def __init__(self, publish: Callable[[Event], None], interval_s: float = 1.0) -> None:
        self.publish = publish
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            psutil.cpu_percent(interval=None)  # prime the CPU counter so the first figure is real
            self._thread = threading.Thread(target=self._run, name="xswarm-telemetry", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish(sample())
            except Exception:  # a flaky NVML read must not end sampling for the session
                log.exception("system sample failed")
