"""The Twilio Media Streams bridge, through the real server, with a client written from
Twilio's documentation (message shapes of twilio.com/docs/voice/media-streams/websocket-messages),
not from the ``xswarm call`` simulator."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from local_http import start_local_app
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine import events
from engine.audio import mulaw
from engine.config import load_settings
from engine.models.base import StepInput, StepOutput
from engine.models.echo import EchoModel
from engine.runtime import Runtime
from engine.store import calls as call_rows
from engine.store import nodes
from engine.telephony.calltoken import mint

AUTH_TOKEN = "twilio-auth-token-for-tests"
TOKEN_SECRET = "call-token-secret-for-tests"
PUBLIC = "wss://voice.example.test"
ACCOUNT = "AC" + "1" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("XSWARM_CALL_TOKEN_SECRET", TOKEN_SECRET)
    monkeypatch.setenv("XSWARM_BRIDGE_PUBLIC_URL", PUBLIC)
    monkeypatch.setenv("XSWARM_TELEPHONY__START_TIMEOUT_S", "0.5")


def start_runtime(**settings_overrides: Any) -> tuple[Runtime, list[events.Event]]:
    settings = load_settings(**settings_overrides)
    runtime = Runtime(settings, model_spec="echo", bridge_port=free_port(), supervisor_port=0, webhooks_port=0)
    seen: list[events.Event] = []
    runtime.bus.subscribe(seen.append)
    runtime.start()
    deadline = time.monotonic() + 10
    while runtime.model is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert runtime.model is not None
    return runtime, seen


@pytest.fixture
def bridge(env: None) -> Iterator[tuple[Runtime, list[events.Event]]]:
    runtime, seen = start_runtime()
    yield runtime, seen
    runtime.stop()


# ----------------------------------------------------------------- a Twilio-like client


class Twilio:
    """What Twilio does on a <Connect><Stream>, message by message."""

    def __init__(self, port: int, call_sid: str = "CA" + "a" * 32, stream_sid: str = "MZ" + "b" * 32) -> None:
        self.port = port
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.seq = 0
        self.ws: ClientConnection | None = None
        self.received: list[dict[str, Any]] = []

    def signature(self, url: str = PUBLIC + "/twilio") -> str:
        return RequestValidator(AUTH_TOKEN).compute_signature(url, {})

    async def open(self, signature: str | None = "valid") -> ClientConnection:
        headers = (
            {} if signature is None else {"X-Twilio-Signature": self.signature() if signature == "valid" else signature}
        )
        self.ws = await connect(f"ws://127.0.0.1:{self.port}/twilio", additional_headers=headers, max_size=2**20)
        return self.ws

    def _next(self) -> str:
        self.seq += 1
        return str(self.seq)

    async def send(self, message: dict[str, Any] | str) -> None:
        assert self.ws is not None
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def connected(self) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    async def start(self, token: str | None = None, media_format: dict[str, Any] | None = None, **params: str) -> None:
        custom = dict(params)
        if token is not None:
            custom["token"] = token
        await self.send(
            {
                "event": "start",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": ACCOUNT,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": custom,
                    "mediaFormat": media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )

    async def media(self, payload: bytes, chunk: int) -> None:
        await self.send(
            {
                "event": "media",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "media": {
                    "track": "inbound",
                    "chunk": str(chunk),
                    "timestamp": str((chunk - 1) * 20),
                    "payload": base64.b64encode(payload).decode(),
                },
            }
        )

    async def mark(self, name: str) -> None:
        await self.send(
            {"event": "mark", "sequenceNumber": self._next(), "streamSid": self.stream_sid, "mark": {"name": name}}
        )

    async def dtmf(self, digit: str) -> None:
        await self.send(
            {
                "event": "dtmf",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def stop(self) -> None:
        await self.send(
            {
                "event": "stop",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": ACCOUNT, "callSid": self.call_sid},
            }
        )

    async def play(self, ulaw: bytes, echo_marks: bool = True) -> None:
        """Send 20 ms chunks in real time while collecting (and acknowledging) what comes back."""
        reader = asyncio.get_running_loop().create_task(self.collect(echo_marks))
        origin = time.monotonic()
        for k in range(len(ulaw) // 160):
            await asyncio.sleep(max(0.0, origin + k * 0.02 - time.monotonic()))
            await self.media(ulaw[k * 160 : (k + 1) * 160], k + 1)
        await asyncio.sleep(0.4)
        await stop_task(reader)

    async def collect(self, echo_marks: bool = True) -> None:
        assert self.ws is not None
        async for raw in self.ws:
            assert isinstance(raw, str), "Twilio accepts text frames only"
            msg = json.loads(raw)
            self.received.append(msg)
            if msg["event"] == "mark" and echo_marks:
                await self.mark(msg["mark"]["name"])

    async def closed(self) -> tuple[int | None, str]:
        assert self.ws is not None
        try:
            async with asyncio.timeout(5):
                async for _ in self.ws:
                    pass
        except ConnectionClosed:
            pass
        return self.ws.close_code, self.ws.close_reason or ""


async def stop_task(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, ConnectionClosed):
        pass


async def _closed_via(reader: asyncio.Task[Any], twilio: Twilio) -> tuple[int | None, str]:
    """The reader task owns recv: wait for it to see the close."""
    try:
        async with asyncio.timeout(5):
            await reader
    except ConnectionClosed:
        pass
    assert twilio.ws is not None
    return twilio.ws.close_code, twilio.ws.close_reason or ""


def token(call_sid: str = "CA" + "a" * 32, ttl: int = 60, now: float | None = None) -> str:
    return mint(TOKEN_SECRET, call_sid, ttl, now=now)


def speech(seconds: float, seed: int = 3) -> np.ndarray:
    n = int(seconds * 8000)
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / 8000)
    spectrum[(freqs < 300) | (freqs > 3000)] = 0
    x = np.fft.irfft(spectrum, n)
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


async def streaming_call(runtime: Runtime) -> tuple[Twilio, asyncio.Task[Any]]:
    """A started call whose replies are being collected in the background."""
    twilio = Twilio(runtime.bridge_port)  # type: ignore[arg-type]
    await twilio.open()
    await twilio.connected()
    await twilio.start(token())
    return twilio, asyncio.get_running_loop().create_task(twilio.collect())


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------ the good path


async def test_health_on_the_bridge_port(bridge: tuple[Runtime, list[events.Event]]) -> None:
    runtime, _ = bridge
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{runtime.bridge_port}/health").read()
    )
    health = json.loads(body)
    assert health["model"] == "echo" and health["slots"] == {"total": 128, "used": 0, "free": 128}
    assert health["uptime_s"] >= 0 and health["auth"] == {"signature": True, "call_token": True}


async def test_full_call_both_directions_and_echo_round_trip(bridge: tuple[Runtime, list[events.Event]]) -> None:
    runtime, seen = bridge
    twilio = Twilio(runtime.bridge_port)  # type: ignore[arg-type]
    await twilio.open()
    await twilio.connected()
    await twilio.start(token(), user_id="guest", theme="kitt")
    await wait_for(lambda: runtime.calls.get(twilio.call_sid) is not None)
    session = runtime.calls.get(twilio.call_sid)
    assert session is not None and session.theme == "kitt" and session.user_id is None

    sent = speech(3.0)
    await twilio.play(mulaw.encode(sent).tobytes())
    await twilio.dtmf("7")
    await twilio.stop()
    assert (await twilio.closed())[0] == 1000

    media = [m for m in twilio.received if m["event"] == "media"]
    marks = [m for m in twilio.received if m["event"] == "mark"]
    assert media and all(m["streamSid"] == twilio.stream_sid for m in twilio.received)
    assert all(set(m) == {"event", "streamSid", "media"} and set(m["media"]) == {"payload"} for m in media)
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in media)
    # exactly one mark after every four media messages
    kinds = "".join("m" if m["event"] == "media" else "k" for m in twilio.received if m["event"] in ("media", "mark"))
    assert kinds == "mmmmk" * len(marks)

    reply = mulaw.decode(b"".join(base64.b64decode(m["media"]["payload"]) for m in media))
    # the echo model returns each frame one tick later; find our audio in the reply
    n = 12000
    scores = [float(np.dot(reply[d : d + n], sent[:n])) for d in range(0, len(reply) - n)]
    lag = int(np.argmax(scores))
    aligned = reply[lag : lag + n]
    assert np.corrcoef(aligned, sent[:n])[0, 1] > 0.98
    # the reply starts at the call's first tick; the caller's first sample sits ``lead`` bytes
    # into the first frame the jitter buffer formed, after ``preroll`` empty ticks; the echo
    # model returns each frame exactly one step later; the two resamplers add 23 samples.
    frames = session.inbound
    assert frames is not None
    assert lag == (frames.preroll + 1) * 640 + frames.lead + 23

    await wait_for(lambda: runtime.calls.get(twilio.call_sid) is None)
    assert any(isinstance(e, events.DtmfReceived) and e.digit == "7" for e in seen)
    ended = [e for e in seen if isinstance(e, events.CallEnded)]
    assert ended and ended[0].reason == "caller hung up"
    stats = runtime.bridge.describe()
    assert stats["bal_ms"]["count"] > 20 and stats["playout_lag_ms"]["count"] > 20
    assert stats["bal_ms"]["p50"] < 60

    assert runtime.db is not None
    await wait_for(lambda: (call_rows.get(runtime.db, twilio.call_sid) or {}).get("status") == "ended")
    row = call_rows.get(runtime.db, twilio.call_sid)
    assert row is not None and row["end_reason"] == "caller hung up" and row["source"] == "twilio"
    assert row["bal_p50_ms"] is not None and row["stream_sid"] == twilio.stream_sid and row["late_frames"] >= 0


async def test_takeover_sends_clear_and_hang_up_uses_twilio_rest(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    hits: list[dict[str, Any]] = []

    async def calls_endpoint(request: web.Request) -> web.Response:
        hits.append(
            {"path": request.path, "form": dict(await request.post()), "auth": request.headers.get("Authorization")}
        )
        return web.json_response({"sid": request.match_info["sid"], "status": "completed"})

    runner, port = await start_local_app(web.post("/2010-04-01/Accounts/{account}/Calls/{sid}.json", calls_endpoint))
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
    monkeypatch.setenv("XSWARM_TWILIO__API_BASE", f"http://127.0.0.1:{port}")
    runtime, seen = start_runtime()
    try:
        twilio, reader = await streaming_call(runtime)
        await wait_for(lambda: runtime.calls.get(twilio.call_sid) is not None)
        session = runtime.calls.get(twilio.call_sid)
        assert session is not None
        await asyncio.wrap_future(runtime.call_soon(_async(lambda: session.take_over("alice"))))
        await wait_for(lambda: any(m["event"] == "clear" for m in twilio.received))
        clears = [m for m in twilio.received if m["event"] == "clear"]
        assert clears == [{"event": "clear", "streamSid": twilio.stream_sid}]
        await asyncio.wrap_future(runtime.call_soon(session.hang_up("operator ended the call")))
        code, reason = await twilio.closed() if reader.done() else await _closed_via(reader, twilio)
        assert code == 1000 and "hung up" in reason
        assert hits and hits[0]["path"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{twilio.call_sid}.json"
        assert hits[0]["form"] == {"Status": "completed"} and hits[0]["auth"].startswith("Basic ")
        await wait_for(lambda: runtime.calls.get(twilio.call_sid) is None)
    finally:
        runtime.stop()
        await runner.cleanup()


async def _async(fn: Any) -> Any:
    return fn()


async def test_frames_dropped_on_a_congested_socket_are_counted_in_metrics(
    env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's socket that holds too much unsent output gets no more frames; each one
    dropped is counted for the node (it outlives the call) and shown in /metrics."""
    from engine.bridge import server as bridge_mod
    from engine.telemetry.metrics import Metrics

    monkeypatch.setattr(bridge_mod, "WRITE_BUFFER_LIMIT", -1)  # every socket reads as congested
    runtime, _ = start_runtime()
    try:
        twilio, reader = await streaming_call(runtime)
        await wait_for(lambda: runtime.bridge.dropped_frames >= 3)
        assert not any(m["event"] == "media" for m in twilio.received)
        assert runtime.bridge.describe()["dropped_frames"] >= 3
        metrics = Metrics(runtime)
        body = metrics.render()[0].decode()
        metrics.close()
        dropped = [line for line in body.splitlines() if line.startswith("xswarm_bridge_dropped_frames_total ")]
        assert dropped and float(dropped[0].split()[1]) >= 3
        reader.cancel()
    finally:
        runtime.stop()


async def test_complete_call_treats_an_ended_call_as_done_and_reports_failures(
    env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The REST hang-up's answers, from a local fake Twilio: done, already ended (404 / 20404),
    refused, unreachable; and nothing to do without credentials."""
    from engine.bridge.server import complete_call

    answers = {
        "CAok": web.json_response({"status": "completed"}),
        "CAgone": web.json_response({"code": 20404, "message": "not found", "status": 404}, status=404),
        "CAbad": web.json_response({"code": 20003, "message": "Authenticate", "status": 401}, status=401),
    }
    forms: list[dict[str, Any]] = []

    async def calls_endpoint(request: web.Request) -> web.Response:
        forms.append(dict(await request.post()))
        return answers[request.match_info["sid"]]

    runner, port = await start_local_app(web.post("/2010-04-01/Accounts/{account}/Calls/{sid}.json", calls_endpoint))
    try:
        monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
        monkeypatch.setenv("XSWARM_TWILIO__API_BASE", f"http://127.0.0.1:{port}")
        settings = load_settings()
        assert await complete_call(settings, "CAok") is True
        assert await complete_call(settings, "CAgone") is True
        assert await complete_call(settings, "CAbad") is False
        assert forms == [{"Status": "completed"}] * 3
        monkeypatch.setenv("XSWARM_TWILIO__API_BASE", f"http://127.0.0.1:{free_port()}")
        assert await complete_call(load_settings(), "CAok") is False  # nobody listening
        monkeypatch.delenv("TWILIO_ACCOUNT_SID")
        assert await complete_call(load_settings(), "CAok") is True  # no credentials: nothing to do
        assert len(forms) == 3
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- refusals


async def refused(runtime: Runtime, script: Any, *, signature: str | None = "valid") -> tuple[int | None, str]:
    twilio = Twilio(runtime.bridge_port)  # type: ignore[arg-type]
    await twilio.open(signature)
    await script(twilio)
    return await twilio.closed()


async def test_every_refusal_closes_only_its_own_stream(bridge: tuple[Runtime, list[events.Event]]) -> None:
    runtime, seen = bridge
    # a healthy call streams throughout
    good = Twilio(runtime.bridge_port, call_sid="CA" + "9" * 32, stream_sid="MZ" + "9" * 32)  # type: ignore[arg-type]
    await good.open()
    await good.connected()
    await good.start(token(good.call_sid))
    healthy = asyncio.get_running_loop().create_task(good.play(mulaw.encode(speech(8.0)).tobytes()))
    await wait_for(lambda: runtime.calls.get(good.call_sid) is not None)
    good_session = runtime.calls.get(good.call_sid)
    assert good_session is not None

    async def no_start(t: Twilio) -> None:
        await t.connected()

    async def bad_format(t: Twilio) -> None:
        await t.connected()
        await t.start(token(), media_format={"encoding": "audio/l16", "sampleRate": 16000, "channels": 1})

    async def missing_token(t: Twilio) -> None:
        await t.start(None)

    async def wrong_call(t: Twilio) -> None:
        await t.start(token("CA" + "c" * 32))

    async def expired(t: Twilio) -> None:
        await t.start(token(ttl=1, now=time.time() - 30))

    async def bad_json(t: Twilio) -> None:
        await t.send("{not json")

    async def bad_base64(t: Twilio) -> None:
        t.call_sid = "CA" + "e" * 32
        await t.start(token(t.call_sid))
        await t.send(
            {
                "event": "media",
                "sequenceNumber": "2",
                "streamSid": t.stream_sid,
                "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "!!not base64!!"},
            }
        )

    async def too_big(t: Twilio) -> None:
        await t.send({"event": "media", "media": {"payload": "A" * 70000}})

    async def flood(t: Twilio) -> None:
        t.call_sid = "CA" + "f" * 32
        await t.start(token(t.call_sid))
        for k in range(600):
            await t.media(b"\xff" * 160, k + 1)

    cases = [
        (no_start, 4001, "no start", "start_timeout"),
        (bad_format, 4002, "media format", "bad_media_format"),
        (missing_token, 4003, "missing call token", "bad_token"),
        (wrong_call, 4003, "does not match", "bad_token"),
        (expired, 4003, "expired", "bad_token"),
        (bad_json, 4004, "malformed JSON", "malformed_json"),
        (bad_base64, 4004, "base64", "malformed_base64"),
        (too_big, 1009, "", "message_too_big"),
        (flood, 4008, "flood", "flood"),
    ]
    for script, code, reason, key in cases:
        got_code, got_reason = await refused(runtime, script)
        assert got_code == code, (script.__name__, got_code, got_reason)
        assert reason in got_reason, (script.__name__, got_reason)
        await wait_for(lambda: runtime.bridge.refusals[key] >= 1)  # type: ignore[union-attr]  # noqa: B023 - awaited here

    # a reused token: the first use works, the second is refused
    once = Twilio(runtime.bridge_port, call_sid="CA" + "7" * 32)  # type: ignore[arg-type]
    tok = token(once.call_sid)
    await once.open()
    await once.start(tok)
    await wait_for(lambda: runtime.calls.get(once.call_sid) is not None)
    await once.stop()
    await once.closed()
    await wait_for(lambda: runtime.calls.get(once.call_sid) is None)

    async def reuse(t: Twilio) -> None:
        t.call_sid = once.call_sid
        await t.start(tok)

    code, reason = await refused(runtime, reuse)
    assert code == 4003 and "already used" in reason

    # an unsigned and a wrongly signed upgrade never get a socket
    for signature in (None, "bm90IGEgc2lnbmF0dXJl"):
        with pytest.raises(InvalidStatus) as info:
            await Twilio(runtime.bridge_port).open(signature)  # type: ignore[arg-type]
        assert info.value.response.status_code == 403
    assert runtime.bridge.refusals["bad_signature"] == 2

    assert not healthy.done()  # still streaming: everything above happened during the call
    assert good_session.late_frames <= 2 and not good_session.ended
    await healthy
    await good.stop()
    assert (await good.closed())[0] == 1000
    session_frames = [m for m in good.received if m["event"] == "media"]
    assert len(session_frames) >= 4 * 95  # the healthy call got its audio all along
    refusal_events = [e.reason for e in seen if isinstance(e, events.CallRefused)]
    assert {"start_timeout", "bad_media_format", "bad_token", "malformed_json", "flood"} <= set(refusal_events)


async def test_no_free_slot_is_refused(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSWARM_MODEL__SLOTS", "1")
    runtime, _ = start_runtime()
    try:
        first = Twilio(runtime.bridge_port, call_sid="CA" + "1" * 32)  # type: ignore[arg-type]
        await first.open()
        await first.start(token(first.call_sid))
        await wait_for(lambda: runtime.calls.used == 1)

        async def second(t: Twilio) -> None:
            t.call_sid = "CA" + "2" * 32
            await t.start(token(t.call_sid))

        code, reason = await refused(runtime, second)
        assert code == 4009 and "busy" in reason
        assert runtime.calls.get(first.call_sid) is not None  # the first call is untouched
        await first.stop()
        await first.closed()
    finally:
        runtime.stop()


class SlowEcho(EchoModel):
    """Echo on a machine too slow for real time: every step sleeps past the 80 ms tick."""

    def step(self, batch: StepInput) -> StepOutput:
        time.sleep(0.1)
        return super().step(batch)


async def test_a_model_without_headroom_refuses_with_its_own_code_and_stops_advertising(
    env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XSWARM_MODEL__SLOTS", "4")
    runtime, seen = start_runtime()
    try:
        slow = SlowEcho(4)

        async def swap() -> None:  # while no call is live, as a model load would
            runtime.scheduler.attach(slow)
            runtime.model = slow

        await asyncio.wrap_future(runtime.call_soon(swap()))
        first = Twilio(runtime.bridge_port, call_sid="CA" + "1" * 32)  # type: ignore[arg-type]
        await first.open()
        await first.start(token(first.call_sid))
        await wait_for(lambda: runtime.scheduler.headroom() is not None, timeout=10)
        assert runtime.calls.free == 3 and runtime.scheduler.missed_ticks >= 1

        async def second(t: Twilio) -> None:
            t.call_sid = "CA" + "2" * 32
            await t.start(token(t.call_sid))

        code, reason = await refused(runtime, second)
        assert code == 4011 and "no headroom" in reason
        assert runtime.bridge.refusals["no_headroom"] == 1 and runtime.bridge.refusals["no_free_slot"] == 0
        assert any(isinstance(e, events.CallRefused) and e.reason == "no_headroom" for e in seen)
        assert runtime.calls.get(first.call_sid) is not None  # the live call goes on
        assert runtime.db is not None
        await wait_for(lambda: nodes.live_nodes(runtime.db)[0].free_slots == 0)  # type: ignore[arg-type]
        snap = runtime.snapshot()
        assert snap["slots"]["available"] == 0 and "no headroom" in snap["slots"]["no_headroom"]
        await first.stop()
        await first.closed()
    finally:
        runtime.stop()


async def test_stop_before_start_closes_cleanly_and_bad_ids_are_refused(
    bridge: tuple[Runtime, list[events.Event]],
) -> None:
    runtime, _ = bridge
    twilio = Twilio(runtime.bridge_port)  # type: ignore[arg-type]
    await twilio.open()
    await twilio.connected()
    await twilio.stop()
    assert (await twilio.closed())[0] == 1000
    assert runtime.bridge.refusals["start_timeout"] == 0  # type: ignore[union-attr]

    async def newline_sid(t: Twilio) -> None:
        t.stream_sid = "MZ1\n"  # would break out of the JSON we write; must not pass
        await t.start(token())

    code, reason = await refused(runtime, newline_sid)
    assert code == 4004 and "streamSid" in reason


async def test_unknown_events_are_ignored(bridge: tuple[Runtime, list[events.Event]]) -> None:
    runtime, _ = bridge
    twilio = Twilio(runtime.bridge_port)  # type: ignore[arg-type]
    await twilio.open()
    await twilio.start(token(), extra="x")
    await twilio.send({"event": "something-new", "sequenceNumber": "2", "streamSid": twilio.stream_sid})
    await twilio.send(
        {"event": "mark", "sequenceNumber": "3", "streamSid": twilio.stream_sid, "mark": {"name": "never-sent"}}
    )
    await twilio.media(b"\xff" * 160, 1)
    await asyncio.sleep(0.2)
    assert runtime.calls.get(twilio.call_sid) is not None
    await twilio.stop()
    assert (await twilio.closed())[0] == 1000
