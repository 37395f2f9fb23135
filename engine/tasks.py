"""Stopping a background task: cancel it, wait for it to finish, keep the caller's own cancel.

Every long-lived loop (the scheduler's tick, the storage rounds, the webhook housekeeping, the
supervisor's sampler) stops the same way. The usual inline form, ``try: await task except
CancelledError: pass``, also swallows a cancel aimed at the *caller* (a shutdown that is itself
being cancelled would carry on); this one re-raises that.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None or finished: nothing to cancel) and wait until it has ended.

    The task's own CancelledError is absorbed; an exception it raised while winding down
    propagates, so a crash at shutdown is not hidden."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
