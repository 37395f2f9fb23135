"""The supervisor inside the real Runtime: echo model, 80 ms scheduler, Twilio bridge, database.

Calls come in over the bridge's Media Streams socket as Twilio would send them (20 ms mu-law
chunks at real-time pace), so listen delay, takeover switching and the effect of a stuck
supervisor are measured on the real call path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from engine.audio import mulaw
from engine.config import load_settings
from engine.events import CallEnded, CallUpdated, HandBack, HangUp, Listen, TakeOver, Whisper
from engine.runtime import Runtime
from engine.store import audit
from engine.supervisor import protocol as p
from engine.supervisor.client import SupervisorClient

OPERATOR = "operator-token-0123456789abcdef"
MONITOR = "monitor-token-0123456789abcdef"
CHUNK = 160
"""20 ms of 8 kHz mu-law, what Twilio sends per media message."""
SILENCE = bytes(mulaw.encode(np.zeros(CHUNK, np.float32)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tone_chunk(amplitude: float = 0.5, hz: float = 440.0) -> bytes:
    t = np.arange(CHUNK) / 8000
    return bytes(mulaw.encode((amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)))


def level(ulaw: bytes) -> float:
    return float(np.sqrt(np.mean(mulaw.decode(ulaw) ** 2)))


class Caller:
    """A phone call as Twilio's Media Streams sends it: 20 ms media messages in real time.

    ``source(n)`` gives the mu-law bytes of chunk n; ``sent_at[n]`` is when it went out;
    ``heard`` collects (time, level) of each media message the bridge sends back.
    """

    def __init__(self, port: int, call_sid: str, source: Callable[[int], bytes] | None = None) -> None:
        self.url = f"ws://127.0.0.1:{port}/twilio"
        self.call_sid = call_sid
        self.source = source or (lambda n: SILENCE)
        self.sent_at: list[float] = []
        self.heard: list[tuple[float, float]] = []
        self.ws: ClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> "Caller":
        self.ws = await connect(self.url, compression=None)
        sid = f"MZ{self.call_sid}"
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await self.ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": {
            "streamSid": sid, "callSid": self.call_sid, "accountSid": "AC0", "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"caller": "+15550001111"}}}))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send()), loop.create_task(self._receive())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        if self.ws is not None:
            await self.ws.close()

    async def _send(self) -> None:
        assert self.ws is not None
        start = time.monotonic()
        n = 0
        while True:
            payload = base64.b64encode(self.source(n)).decode()
            await self.ws.send(json.dumps({"event": "media", "streamSid": f"MZ{self.call_sid}",
                                           "media": {"track": "inbound", "chunk": str(n), "payload": payload}}))
            self.sent_at.append(time.time())
            n += 1
            await asyncio.sleep(max(0.0, start + n * 0.02 - time.monotonic()))

    async def _receive(self) -> None:
        assert self.ws is not None
        async for raw in self.ws:
            msg = json.loads(raw)
            if msg.get("event") == "media":
                self.heard.append((time.time(), level(base64.b64decode(msg["media"]["payload"]))))
            elif msg.get("event") == "mark":  # echo marks as Twilio does once played
                await self.ws.send(json.dumps({"event": "mark", "streamSid": msg["streamSid"], "mark": msg["mark"]}))

    def first_heard_after(self, t0: float, above: float = 0.05) -> float | None:
        for at, lvl in self.heard:
            if at >= t0 and lvl > above:
                return at
        return None


@pytest.fixture
def runtime(xswarm_home):
    settings = load_settings(supervisor={"token": OPERATOR, "monitor_token": MONITOR}, model={"name": "echo", "slots": 8})
    rt = Runtime(settings, model_spec="echo", bridge_port=free_port(), supervisor_port=free_port(), webhooks_port=0)
    rt.start()
    deadline = time.monotonic() + 20
    while rt.model is None:
        assert time.monotonic() < deadline, "echo model did not load"
        time.sleep(0.02)
    try:
        yield rt
    finally:
        rt.stop()


def sup_url(rt: Runtime) -> str:
    return f"ws://127.0.0.1:{rt.supervisor_port}/"


async def wait_call(client: SupervisorClient, rt: Runtime, call_id: str) -> None:
    deadline = time.monotonic() + 5
    while rt.calls.get(call_id) is None:
        assert time.monotonic() < deadline, f"call {call_id} was not admitted"
        await asyncio.sleep(0.02)


async def test_snapshot_of_a_live_call_matches_the_schema(runtime: Runtime) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    async with Caller(runtime.bridge_port, "CA100"):
        async with SupervisorClient(sup_url(runtime), MONITOR) as mon:
            await wait_call(mon, runtime, "CA100")
        async with SupervisorClient(sup_url(runtime), MONITOR) as mon:
            snap = mon.snapshot
    jsonschema.validate(snap, p.schemas()["snapshot"])
    assert snap["model"]["name"] == "echo" and [c["call_id"] for c in snap["calls"]] == ["CA100"]
    assert snap["calls"][0]["mode"] == "ai"


async def test_listen_is_live_and_echo_is_heard(runtime: Runtime) -> None:
    """A 20 ms burst from the caller shows up in the listener's caller stream, then (echo
    model) in its AI stream one frame later; how far behind the caller it arrives is printed."""
    burst_at = {"n": None}

    def source(n: int) -> bytes:
        return tone_chunk() if burst_at["n"] is not None and burst_at["n"] <= n < burst_at["n"] + 4 else SILENCE

    async with Caller(runtime.bridge_port, "CA200", source) as caller:
        async with SupervisorClient(sup_url(runtime), MONITOR) as mon:
            await wait_call(mon, runtime, "CA200")
            await mon.command(Listen("CA200"))
            await asyncio.sleep(0.3)
            burst_at["n"] = len(caller.sent_at) + 2
            heard: dict[str, float] = {}
            tap_delay: list[float] = []
            deadline = time.monotonic() + 3
            while len(heard) < 2 and time.monotonic() < deadline:
                frame = await mon.next_audio(2)
                tap_delay.append(frame.delay_s)
                if frame.direction not in heard and np.sqrt(np.mean(frame.pcm**2)) > 0.05:
                    heard[frame.direction] = frame.received_at
            sent = caller.sent_at[burst_at["n"]]
    assert set(heard) == {"caller", "ai"}, heard
    behind_caller = heard["caller"] - sent
    print(f"listen: caller burst heard {behind_caller * 1000:.1f} ms after it began; "
          f"tap->client p50 {np.median(tap_delay) * 1000:.2f} ms")
    assert behind_caller < 0.5  # loose: the figure that matters is in benchmarks/supervisor.py
    assert 0.04 <= heard["ai"] - heard["caller"] <= 0.5  # echo: one frame later


async def test_takeover_switches_the_callers_audio_and_hand_back_restores_it(runtime: Runtime) -> None:
    async with Caller(runtime.bridge_port, "CA300") as caller:
        async with SupervisorClient(sup_url(runtime), OPERATOR, name="alice") as op, \
                SupervisorClient(sup_url(runtime), MONITOR, name="eve") as mon:
            await wait_call(op, runtime, "CA300")
            await asyncio.sleep(0.3)
            assert caller.first_heard_after(0) is None  # the echo of silence is silence
            t0 = time.time()
            await op.command(TakeOver("CA300"))
            tone = (0.5 * np.sin(2 * np.pi * 300 * np.arange(1920) / 24000)).astype(np.float32)
            for _ in range(10):
                await op.send_audio("CA300", tone)
                await asyncio.sleep(0.08)
            switched = caller.first_heard_after(t0)
            seen = [m async for m in _take(mon, 5) if isinstance(m, CallUpdated)]
            await op.command(HandBack("CA300"))
            t1 = time.time()
            await asyncio.sleep(0.5)
            after = [lvl for at, lvl in caller.heard if at > t1 + 0.2]
    assert switched is not None, "the caller never heard the operator"
    print(f"takeover switch: {(switched - t0) * 1000:.1f} ms from command to the caller's socket")
    assert switched - t0 < 1.0
    assert any(e.mode == "operator" and e.operator == op.actor for e in seen)
    assert after and max(after) < 0.05  # back to the AI (echoing silence)


async def test_whisper_and_hangup_on_the_real_call_path(runtime: Runtime) -> None:
    async with Caller(runtime.bridge_port, "CA400"):
        async with SupervisorClient(sup_url(runtime), OPERATOR, name="alice") as op:
            await wait_call(op, runtime, "CA400")
            await op.command(Whisper("CA400", "mention the refund"))
            await op.command(HangUp("CA400"))
            ended = await _next_of(op, CallEnded)
    assert ended.call_id == "CA400" and "alice" in ended.reason
    rows = audit.recent(runtime.db, call_id="CA400")
    assert [r.action for r in reversed(rows)] == ["whisper", "hangup"] and all(r.result == "ok" for r in rows)


async def test_metrics_read_the_runtime(runtime: Runtime) -> None:
    async with Caller(runtime.bridge_port, "CA500"):
        async with SupervisorClient(sup_url(runtime), MONITOR) as mon:
            await wait_call(mon, runtime, "CA500")
            await asyncio.sleep(0.5)
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{runtime.supervisor_port}/metrics", timeout=5).read().decode()
            )
    assert "xswarm_calls_open 1.0" in body and "xswarm_slots_total 8.0" in body
    assert "xswarm_step_duration_ms_count" in body and 'xswarm_step_duration_ms_bucket{le="+Inf"}' in body
    assert "xswarm_bridge_added_latency_ms_count" in body
    assert "xswarm_missed_ticks_total" in body and "xswarm_supervisor_clients 1.0" in body


@pytest.mark.slow
async def test_a_supervisor_that_never_reads_does_not_delay_calls(runtime: Runtime) -> None:
    """Echo round trip and tick figures of 4 live calls, without and then with a supervisor that
    listens to every call and never reads its socket."""

    async def measure(caller: Caller, seconds: float) -> tuple[list[float], list[float]]:
        """Echo round trips (a burst every 200 ms, time until its echo is heard) and the
        bridge-added latency samples of the same window."""
        bal = runtime.bridge.bal_ms
        first = bal.count
        trips = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            caller.marker = len(caller.sent_at) + 1  # type: ignore[attr-defined]
            await asyncio.sleep(0.04)
            sent = caller.sent_at[caller.marker]  # type: ignore[attr-defined]
            await asyncio.sleep(0.16)
            heard = caller.first_heard_after(sent)
            if heard is not None:
                trips.append(heard - sent)
        window = [bal._ring[i % bal._window] for i in range(first, bal.count)]
        return trips, window

    def source_for(caller_ref: list[Caller]) -> Callable[[int], bytes]:
        return lambda n: tone_chunk() if caller_ref and getattr(caller_ref[0], "marker", -1) == n else SILENCE

    refs: list[list[Caller]] = [[] for _ in range(4)]
    callers = [Caller(runtime.bridge_port, f"CA6{i:02d}", source_for(refs[i])) for i in range(4)]
    for i, c in enumerate(callers):
        refs[i].append(c)
        await c.__aenter__()
    try:
        while len(runtime.calls) < 4:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        missed0 = runtime.scheduler.missed_ticks
        base, base_bal = await measure(callers[0], 4.0)
        missed1 = runtime.scheduler.missed_ticks
        stuck = await connect_stuck(sup_url(runtime), MONITOR)
        for i in range(4):
            await stuck.send(json.dumps({"v": 1, "type": "listen", "id": i, "call_id": f"CA6{i:02d}"}))
        loaded, loaded_bal = await measure(callers[0], 4.0)
        missed2 = runtime.scheduler.missed_ticks
        dropped = runtime.supervisor.metrics.dropped.labels(kind="audio")._value.get()
        await stuck.close()
    finally:
        for c in callers:
            await c.__aexit__(None, None, None)
    print(f"echo round trip p50 without {np.median(base) * 1000:.1f} ms, with a stuck supervisor "
          f"{np.median(loaded) * 1000:.1f} ms; bridge-added latency p50 {np.median(base_bal):.2f} vs "
          f"{np.median(loaded_bal):.2f} ms; missed ticks {missed1 - missed0} vs {missed2 - missed1}; "
          f"audio frames dropped for it {dropped:.0f}")
    assert len(base) > 10 and len(loaded) > 10
    assert dropped > 0  # the stuck socket's audio was dropped, not queued without bound
    assert np.median(loaded_bal) < np.median(base_bal) + 20  # milliseconds: no queueing behind it
    assert np.median(loaded) < np.median(base) + 0.08  # within one tick of the baseline


async def connect_stuck(url: str, token: str) -> ClientConnection:
    """A supervisor that never reads: websockets stops reading the socket once ``max_queue``
    messages wait, and a 4 KiB receive buffer makes TCP push back on the server at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return await connect(url, sock=sock, additional_headers={"Authorization": f"Bearer {token}"},
                         max_queue=1, compression=None)


async def _take(client: SupervisorClient, n: int):
    for _ in range(n):
        try:
            yield await client.next_message(0.5)
        except TimeoutError:
            return


async def _next_of(client: SupervisorClient, kind: type, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        message = await client.next_message(max(0.01, deadline - time.monotonic()))
        if isinstance(message, kind):
            return message
