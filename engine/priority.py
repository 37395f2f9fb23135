"""Priority for work that shares a machine with live calls.

The real-time process (bridge, scheduler, model, supervisor) runs at the priority it was
started with. Everything else on the box that can wait, waits: the webhook processes and a
backup run ``BACKGROUND_NICE`` steps below it, so under CPU contention a caller's audio is
read on time and the background work takes what is left.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("xswarm.priority")

BACKGROUND_NICE = 10


def run_in_background() -> None:
    """Lower this process's CPU priority by ``BACKGROUND_NICE`` and put its disk I/O in the
    idle class (Linux; elsewhere, or where not permitted, the CPU part only or nothing)."""
    try:
        os.nice(BACKGROUND_NICE)
    except OSError as exc:
        log.info("could not lower the CPU priority: %s", exc)
    import psutil

    idle = getattr(psutil, "IOPRIO_CLASS_IDLE", None)
    if idle is not None:
        try:
            psutil.Process().ionice(idle)
        except (psutil.Error, OSError) as exc:
            log.info("could not lower the I/O priority: %s", exc)
