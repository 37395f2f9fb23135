"""End to end: `synthetic:tiny` (the real moshi code, random weights) serving simultaneous
simulated Twilio calls through the real runtime, bridge and scheduler, with one batched step.

Timing is not asserted (this CPU is shared and slower than real time under load); what is:
audio comes back for every call in 160-byte Twilio chunks, both calls were served by the same
batched steps, and whisper, takeover and mute each act on their own call only.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import numpy as np
import pytest

from engine import events
from engine.audio import mulaw
from engine.bridge.simulator import StreamTarget, stream_call
from engine.config import load_settings
from engine.runtime import Runtime

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def speechlike(seconds: float, seed: int) -> bytes:
    """8 kHz mu-law: a few harmonics under a syllable-rate envelope, different per caller."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 8000)) / 8000
    f0 = rng.uniform(110, 220)
    voice = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t)
    return bytes(mulaw.encode((0.3 * voice * envelope).astype(np.float32)))


@pytest.fixture
def runtime(xswarm_home: Any) -> Any:
    import torch

    torch.set_num_threads(1)
    # No greeting: the test whispers as the call starts and times its takeover from there.
    settings = load_settings(model={"slots": 2, "device": "cpu", "context": 64, "seed": 1}, telephony={"greet": False})
    rt = Runtime(settings, model_spec="synthetic:tiny", bridge_port=free_port(), supervisor_port=0, webhooks_port=0)
    seen: list[events.Event] = []
    rt.bus.subscribe(seen.append)
    rt.start()
    deadline = time.monotonic() + 180
    while rt.model is None:
        assert rt.model_state != "failed", rt.model_detail
        assert time.monotonic() < deadline, "synthetic:tiny did not load"
        time.sleep(0.05)
    rt.seen = seen
    try:
        yield rt
    finally:
        rt.stop()


async def test_two_calls_share_one_batched_step_and_controls_act_per_call(runtime: Runtime) -> None:
    model = runtime.model
    assert model is not None and model.name == "synthetic:tiny" and model.slots == 2
    live_per_step: list[int] = []
    step = model.step

    def counting_step(batch: Any) -> Any:
        live_per_step.append(int(np.count_nonzero(batch.active)))
        return step(batch)

    model.step = counting_step  # type: ignore[method-assign]
    target = StreamTarget(f"ws://127.0.0.1:{runtime.bridge_port}/twilio", {"caller": "+15550001111"})
    calls = [
        asyncio.create_task(stream_call(target, speechlike(5.0, seed), call_sid=f"CA{seed:032d}")) for seed in (1, 2)
    ]
    deadline = time.monotonic() + 30
    while runtime.calls.get(f"CA{1:032d}") is None:
        assert time.monotonic() < deadline, "call 1 was not admitted"
        await asyncio.sleep(0.02)
    one, two = f"CA{1:032d}", f"CA{2:032d}"
    while runtime.calls.get(two) is None:
        assert time.monotonic() < deadline, "call 2 was not admitted"
        await asyncio.sleep(0.02)
    runtime.call_soon(_act(runtime, one, lambda s: s.whisper("hello thanks"))).result(timeout=5)
    await asyncio.sleep(1.0)
    tone = (0.8 * np.sin(2 * np.pi * 1000 * np.arange(int(1.2 * 24000)) / 24000)).astype(np.float32)
    runtime.call_soon(_act(runtime, one, lambda s: (s.take_over("op"), s.feed_operator_audio(tone)))).result(timeout=5)
    runtime.call_soon(_act(runtime, two, lambda s: s.mute(True))).result(timeout=5)
    await asyncio.sleep(1.5)
    runtime.call_soon(_act(runtime, one, lambda s: s.hand_back("op"))).result(timeout=5)
    reports = await asyncio.wait_for(asyncio.gather(*calls), timeout=120)

    assert max(live_per_step) == 2, "the two calls were never stepped together"
    replies = []
    for report in reports:
        assert report.chunks_received >= 20, report.to_json()  # ≥ 0.4 s of audio came back
        assert len(report.reply) == 160 * report.chunks_received
        assert report.marks_echoed >= report.chunks_received // 4 - 4  # a clear may cut a group short
        reply = mulaw.decode(report.reply)
        assert np.sqrt(np.mean(reply**2)) > 1e-3, "the model's audio was silent"
        replies.append(reply)
    n = min(len(r) for r in replies)
    assert not np.array_equal(replies[0][:n], replies[1][:n]), "both calls got the same audio"
    # Takeover: call 1's caller heard the operator's loud tone; call 2 never did.
    assert np.abs(replies[0]).max() > 0.5 and np.abs(replies[1]).max() < 0.5
    # Mute: call 2's audio stopped (cleared), call 1 (handed back) kept getting audio after.
    assert reports[1].clears >= 1 and reports[1].chunks_received < reports[0].chunks_received
    assert reports[0].clears >= 2  # take over and hand back each flush queued audio

    texts: dict[str, str] = {}
    for event in runtime.seen:  # type: ignore[attr-defined]
        if isinstance(event, events.TranscriptAppended):
            texts[event.call_id] = texts.get(event.call_id, "") + event.text
    assert "hello thanks" in texts.get(f"CA{1:032d}", ""), texts
    assert "hello thanks" not in texts.get(f"CA{2:032d}", "")
    assert model.last_step_ms is not None and model.describe()["step_ms_p50"] is not None


async def _act(runtime: Runtime, call_id: str, action: Any) -> None:
    """Apply a control on the runtime loop, where CallSession methods must be called."""
    session = runtime.calls.get(call_id)
    assert session is not None
    action(session)
