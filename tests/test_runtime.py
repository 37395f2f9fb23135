"""The Runtime: start/stop, model status, node heartbeat, snapshot, servers, local-audio calls."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from typing import Any

import numpy as np
import pytest
from webhooks_support import PUBLIC_URL, TWILIO_TOKEN, twilio_post

from engine import events
from engine.bridge.local_audio import LocalAudioError
from engine.config import load_settings
from engine.models.base import FRAME_SIZE
from engine.runtime import Runtime
from engine.store import calls as call_rows
from engine.store import feed, nodes
from engine.store.db import Database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def started(spec: str = "echo", **ports: int) -> tuple[Runtime, list[events.Event]]:
    args = {"bridge_port": free_port(), "supervisor_port": 0, "webhooks_port": 0} | ports
    runtime = Runtime(load_settings(), model_spec=spec, **args)
    seen: list[events.Event] = []
    runtime.bus.subscribe(seen.append)
    runtime.start()
    return runtime, seen


def wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def get_json(url: str) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def test_start_load_heartbeat_snapshot_stop() -> None:
    runtime, seen = started()
    try:
        # the model is attached a moment before "ready" is published: wait for the event itself
        wait(lambda: any(isinstance(e, events.ModelStatusChanged) and e.state == "ready" for e in seen))
        states = [e.state for e in seen if isinstance(e, events.ModelStatusChanged)]
        assert states[0] == "loading" and states[-1] == "ready" and "warming" in states
        assert runtime.calls.capacity == 128 and runtime.scheduler.model is runtime.model
        assert runtime.db is not None
        wait(lambda: bool(nodes.live_nodes(runtime.db)) and nodes.live_nodes(runtime.db)[0].slots_total == 128)
        node = nodes.live_nodes(runtime.db)[0]
        assert node.node_id == runtime.node_id and node.model == "echo" and node.free_slots == 128
        assert node.bridge_url == f"ws://127.0.0.1:{runtime.bridge_port}"
        snap = runtime.snapshot()
        json.dumps(snap)  # JSON-able as promised
        assert snap["slots"] == {"total": 128, "used": 0, "free": 128, "available": 128, "no_headroom": None}
        assert runtime.storage is not None and snap["storage"] == runtime.storage.status()
        assert "last_error" in snap["storage"] and snap["scheduler"]["no_headroom"] is None
        assert snap["model"]["state"] == "ready" and snap["node"]["bridge_port"] == runtime.bridge_port
        assert snap["model"]["facts"] == {"model": "echo", "slots": 128}  # what the model says of itself
        assert any(e["type"] == "ModelStatusChanged" for e in snap["recent_events"])
    finally:
        runtime.stop()
    assert runtime.loop.is_closed()
    with Database.from_settings(load_settings()) as check:
        assert nodes.live_nodes(check) == []  # a stopped node takes its row away


def test_auto_without_weights_falls_back_to_echo_and_says_so() -> None:
    runtime, seen = started("auto")
    try:
        wait(lambda: runtime.model is not None)
        assert runtime.model is not None and runtime.model.name == "echo"
        fallback = [e for e in seen if isinstance(e, events.ModelStatusChanged) and e.state == "fallback"]
        assert fallback and "echo" in fallback[0].detail
    finally:
        runtime.stop()


def test_a_model_that_fails_to_load_is_reported_and_calls_are_refused() -> None:
    runtime, seen = started("echo:nonsense")
    try:
        wait(lambda: runtime.model_state == "failed")
        failed = [e for e in seen if isinstance(e, events.ModelStatusChanged) and e.state == "failed"]
        assert failed and "variant" in failed[0].detail
        health = get_json(f"http://127.0.0.1:{runtime.bridge_port}/health")
        assert health["status"] == "starting" and health["slots"]["total"] == 0
    finally:
        runtime.stop()


def test_supervisor_and_webhooks_start_with_the_runtime() -> None:
    runtime, _ = started(supervisor_port=free_port(), webhooks_port=free_port())
    try:
        assert runtime.supervisor_port and runtime.webhooks_port
        assert get_json(f"http://127.0.0.1:{runtime.supervisor_port}/health")
        assert get_json(f"http://127.0.0.1:{runtime.webhooks_port}/health")
    finally:
        runtime.stop()


def test_events_land_in_the_feed_once_samples_do_not_and_the_system_is_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSWARM_UI__POLL_INTERVAL_S", "0.1")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("XSWARM_PUBLIC_URL", PUBLIC_URL)
    runtime, seen = started(webhooks_port=free_port())
    try:
        wait(lambda: runtime.model is not None)
        wait(lambda: any(isinstance(e, events.SystemSampled) for e in seen))
        sample = next(e for e in seen if isinstance(e, events.SystemSampled))
        assert sample.ram_total_bytes > 0 and (sample.gpus or sample.gpu_reason)
        # a real webhook, answered in the child process: its events reach this bus and the
        # runtime's recorder writes them (the child writes no feed rows of its own)
        body, headers = twilio_post({"CallSid": "CA-feed", "From": "+15550009999"}, "/twilio/voice")
        request = urllib.request.Request(
            f"http://127.0.0.1:{runtime.webhooks_port}/twilio/voice", data=body, headers=headers
        )
        assert b"registered users" in urllib.request.urlopen(request, timeout=10).read()
        wait(lambda: any(isinstance(e, events.WebhookReceived) for e in seen))
        hook = next(e for e in seen if isinstance(e, events.WebhookReceived))
        assert hook.provider == "twilio-voice" and hook.event_type == "call"
        assert runtime.db is not None
        busy = runtime.db.submit(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c"
        )  # the writer is busy for a while
        runtime.bus.publish(events.CallRefused(reason="no_free_slot", detail="all 128 slots are busy"))
        assert not busy.done()  # publishing (as the tick does) did not wait for the database
        busy.result(timeout=30)
    finally:
        runtime.stop()
    assert runtime.system_sampler._thread is None  # stopped with the runtime
    sampled = sum(isinstance(e, events.SystemSampled) for e in seen)
    time.sleep(0.3)
    assert sum(isinstance(e, events.SystemSampled) for e in seen) == sampled
    with Database.from_settings(load_settings()) as check:
        rows = feed.recent(check, 1000)
    types = [r.type for r in rows]
    assert types.count("WebhookReceived") == 1 and types.count("CallRefused") == 2  # the child's, then ours
    row = next(r for r in rows if r.type == "WebhookReceived")
    assert row.payload and row.payload["event_type"] == "call"
    assert not {"SystemSampled", "TickSampled", "LatencySampled"} & set(types)
    states = [r.payload["state"] for r in rows if r.type == "ModelStatusChanged" and r.payload]
    assert states == ["ready"]  # the outcome, not every step of the load


def test_port_zero_turns_a_server_off() -> None:
    runtime = Runtime(load_settings(), model_spec="echo", bridge_port=0, supervisor_port=0, webhooks_port=0)
    runtime.start()
    try:
        assert runtime.bridge_port is None and runtime.bridge is None and runtime.snapshot()["bridge"] is None
    finally:
        runtime.stop()


def test_local_call_without_a_sound_device_says_why() -> None:
    runtime, _ = started()
    try:
        wait(lambda: runtime.model is not None)

        class NoDevices:
            default = type("D", (), {"device": None})()

            def query_devices(self) -> list[Any]:
                return []

        with pytest.raises(LocalAudioError, match="no sound devices"):
            runtime.call_soon(runtime.start_local_call(NoDevices())).result(5)
        assert runtime.calls.used == 0
    finally:
        runtime.stop()


def test_local_call_on_this_machine_without_portaudio_is_a_clear_refusal() -> None:
    try:
        import sounddevice

        if sounddevice.query_devices():
            pytest.skip("this machine has a sound device")
    except OSError:
        pass
    runtime, _ = started()
    try:
        wait(lambda: runtime.model is not None)
        with pytest.raises(LocalAudioError) as info:
            runtime.call_soon(runtime.start_local_call()).result(5)
        assert str(info.value).startswith("no audio:") and runtime.calls.used == 0
    finally:
        runtime.stop()


class FakeSoundCard:
    """sounddevice's stream API over a thread that plays the callbacks at real time."""

    def __init__(self) -> None:
        self.default = type("D", (), {"device": [0, 0]})()
        self.played: list[np.ndarray] = []
        self.streams: list[Any] = []
        card = self

        class Stream:
            def __init__(self, *, samplerate: int, channels: int, dtype: str, blocksize: int, callback: Any) -> None:
                assert samplerate == 24000 and blocksize == FRAME_SIZE and channels == 1
                self.callback = callback
                self.running = False
                card.streams.append(self)

            def start(self) -> None:
                self.running = True

            def stop(self) -> None:
                self.running = False

            def close(self) -> None:
                pass

        class InputStream(Stream):
            pass

        class OutputStream(Stream):
            pass

        self.InputStream = InputStream
        self.OutputStream = OutputStream

    def query_devices(self) -> list[str]:
        return ["fake card"]

    def pump(self, frames: list[np.ndarray]) -> None:
        """One mic block and one speaker block per 80 ms, like PortAudio would."""
        mic, speaker = self.streams
        for frame in frames:
            mic.callback(frame[:, None], FRAME_SIZE, None, None)
            out = np.zeros((FRAME_SIZE, 1), np.float32)
            speaker.callback(out, FRAME_SIZE, None, None)
            self.played.append(out[:, 0].copy())
            time.sleep(0.08)


def test_local_call_is_one_more_slot_and_hears_itself_through_echo() -> None:
    runtime, seen = started()
    card = FakeSoundCard()
    try:
        wait(lambda: runtime.model is not None)
        call_id = runtime.call_soon(runtime.start_local_call(card)).result(5)
        session = runtime.calls.get(call_id)
        assert session is not None and session.source == "local" and runtime.calls.used == 1
        tone = [np.full(FRAME_SIZE, 0.1 * (k % 5 + 1), np.float32) for k in range(20)]
        card.pump(tone)
        levels = sorted({round(float(p.mean()), 2) for p in card.played})
        assert {0.1, 0.2, 0.3, 0.4, 0.5} <= set(levels)  # the microphone's frames came back
        runtime.call_soon(session.hang_up("operator")).result(5)
        assert runtime.calls.get(call_id) is None and not any(s.running for s in card.streams)
        assert any(isinstance(e, events.CallStarted) and e.source == "local" for e in seen)
    finally:
        runtime.stop()


async def test_stop_ends_live_calls_and_records_them() -> None:
    from websockets.asyncio.client import connect

    runtime, _ = started()
    try:
        await asyncio.to_thread(wait, lambda: runtime.model is not None)
        ws = await connect(f"ws://127.0.0.1:{runtime.bridge_port}/twilio")
        await ws.send(
            json.dumps(
                {
                    "event": "start",
                    "sequenceNumber": "1",
                    "streamSid": "MZ1",
                    "start": {
                        "accountSid": "AC1",
                        "streamSid": "MZ1",
                        "callSid": "CA-stop",
                        "tracks": ["inbound"],
                        "customParameters": {},
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    },
                }
            )
        )
        await asyncio.to_thread(wait, lambda: runtime.calls.used == 1)
        db = runtime.db
        assert db is not None
        await asyncio.to_thread(runtime.stop)
        async for _ in ws:
            pass
        assert ws.close_code == 1000 and "shutting down" in (ws.close_reason or "")
    finally:
        runtime.stop()
    with Database.from_settings(load_settings()) as check:
        row = call_rows.get(check, "CA-stop")
        kept = [r.type for r in feed.recent(check, call_id="CA-stop")]
    assert row is not None and row["status"] == "ended" and "shutting down" in row["end_reason"]
    assert sorted(kept) == ["CallEnded", "CallStarted"]  # recorded once each, before the database closed


class SlowCloseTransport:
    """A call stream whose close takes ``close_s`` (None: never finishes)."""

    source = "twilio"

    def __init__(self, close_s: float | None) -> None:
        self.close_s = close_s
        self.closed = False

    def send_frame(self, session: Any, step: int, ulaw: bytes, pcm: np.ndarray) -> None:
        pass

    def clear(self) -> None:
        pass

    async def close(self, reason: str) -> None:
        await asyncio.sleep(3600 if self.close_s is None else self.close_s)
        self.closed = True


def test_stop_closes_live_calls_together_under_one_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three slow closes and one that never ends: shutdown waits once, not once per call."""
    from engine import runtime as runtime_mod
    from engine.calls import CallSession

    monkeypatch.setattr(runtime_mod, "CLOSE_CALLS_S", 1.0)
    runtime, seen = started()
    transports = [SlowCloseTransport(0.6), SlowCloseTransport(0.6), SlowCloseTransport(0.6), SlowCloseTransport(None)]
    try:
        wait(lambda: runtime.model is not None)

        async def admit() -> None:
            for i, transport in enumerate(transports):
                runtime.calls.admit(CallSession(f"CA-slow{i}", transport, bus=runtime.bus))

        runtime.call_soon(admit()).result(timeout=5)
        assert runtime.calls.used == 4
        t0 = time.monotonic()
        runtime.stop()
        took = time.monotonic() - t0
    finally:
        runtime.stop()
    assert took < 2.5, f"shutdown took {took:.1f} s"  # one 1 s wait for all calls, not 4 x 0.6 s + 5 s
    assert [t.closed for t in transports] == [True, True, True, False]
    ended = {e.call_id for e in seen if isinstance(e, events.CallEnded)}
    assert ended == {f"CA-slow{i}" for i in range(4)}
