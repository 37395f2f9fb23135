"""engine.tasks.cancel_and_wait: the one way background loops are stopped."""

from __future__ import annotations

import asyncio

import pytest

from engine.tasks import cancel_and_wait


async def test_the_task_has_ended_when_it_returns() -> None:
    cleaned: list[str] = []

    async def loop() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # winding down takes a turn of the loop
            cleaned.append("done")

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and cleaned == ["done"]
    await cancel_and_wait(None)
    await cancel_and_wait(task)  # already finished: nothing happens


async def test_a_cancel_aimed_at_the_caller_is_not_swallowed() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.2)  # slow to wind down, so the caller is cancelled meanwhile

    inner = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    outer = asyncio.create_task(cancel_and_wait(inner))
    await asyncio.sleep(0.05)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert outer.cancelled()


async def test_a_crash_while_winding_down_is_not_hidden() -> None:
    async def broken() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise RuntimeError("flush failed")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="flush failed"):
        await cancel_and_wait(task)
