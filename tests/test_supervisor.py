"""Supervisor server, client library, CallControl and metrics against real parts: a real
websockets server and client on 127.0.0.1, the real ``CallSession``/``CallRegistry``, a real
embedded libSQL database (audit_log) and a fake Twilio REST server at the HTTP boundary.

The runtime here is a small stand-in that owns those real parts (no scheduler): the tests call
the call's taps themselves where a tick would. tests/test_supervisor_runtime.py runs the same
server inside the real Runtime with the echo model and the call simulator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import stat
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from local_http import start_local_app
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.calls import CallRegistry, CallSession
from engine.config import Settings, load_settings
from engine.events import (
    CallUpdated,
    EventBus,
    HandBack,
    HangUp,
    LatencySampled,
    Listen,
    Mute,
    SupervisorActed,
    SystemSampled,
    TakeOver,
    Transfer,
    Unlisten,
    Unmute,
    WebhookFailed,
    WebhookReceived,
    Whisper,
)
from engine.store import audit
from engine.store.migrations import open_database
from engine.supervisor import protocol as p
from engine.supervisor import server as server_mod
from engine.supervisor.auth import TOKEN_FILE, Authenticator, Tokens, load_tokens, token_file
from engine.supervisor.client import AuthError, CommandError, Snapshot, SupervisorClient
from engine.supervisor.server import SupervisorServer

OPERATOR = "operator-token-0123456789abcdef"
OPERATOR2 = OPERATOR  # two operators share the operator role; they differ by socket
MONITOR = "monitor-token-0123456789abcdef"


class RecordingTransport:
    """A call's outbound side that remembers what the call did to it."""

    source = "twilio"

    def __init__(self, registry: CallRegistry) -> None:
        self.registry = registry
        self.cleared = 0
        self.hung_up: str | None = None
        self.session: CallSession | None = None

    def send_frame(self, session: CallSession, step: int, ulaw: bytes, pcm: np.ndarray) -> None:
        pass

    def clear(self) -> None:
        self.cleared += 1

    async def hang_up(self, reason: str) -> None:
        self.hung_up = reason
        assert self.session is not None
        self.registry.finish(self.session, reason)


class StandInRuntime:
    """The runtime contract's attributes, owning real calls and a real database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus = EventBus()
        self.db = open_database(settings)
        self.model = None
        self.model_spec = "echo"
        self.node_state = "ready"
        self.calls = CallRegistry(self.bus)
        self.calls.set_capacity(4)
        self.node_id = "test-node"
        self.started_at = time.time()

    def add_call(self, call_id: str, source: str = "twilio") -> CallSession:
        transport = RecordingTransport(self.calls)
        transport.source = source
        session = CallSession(call_id, transport, bus=self.bus, caller="+15550001111")
        transport.session = session
        self.calls.admit(session)
        return session

    def snapshot(self, *, mask_callers: bool = False) -> dict[str, Any]:
        return {
            "node": {"id": self.node_id},
            "model": None,
            "calls": [dataclasses.asdict(c.live()) for c in self.calls],
            "recent_events": [],
        }

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def settings(xswarm_home: Path) -> Settings:
    return load_settings(supervisor={"token": OPERATOR, "monitor_token": MONITOR})


@pytest.fixture
async def rig(settings: Settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(server_mod, "AUTH_TIMEOUT_S", 0.3)
    runtime = StandInRuntime(settings)
    server = SupervisorServer(runtime)
    await server.start("127.0.0.1", 0)
    try:
        yield runtime, server, f"ws://127.0.0.1:{server.port}/"
    finally:
        await server.stop()
        runtime.close()


async def next_of(client: SupervisorClient, kind: type, timeout: float = 3.0, where=lambda e: True) -> Any:
    """The next message of ``kind`` matching ``where`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await client.next_message(max(0.01, deadline - time.monotonic()))
        if isinstance(message, kind) and where(message):
            return message


async def audit_rows(runtime: Any, **kw: Any) -> list[audit.AuditEntry]:
    """audit_log rows once everything queued so far is committed (the writer is FIFO)."""
    await asyncio.wrap_future(runtime.db.submit("SELECT 1"))
    return audit.recent(runtime.db, **kw)


async def http_get(port: int, path: str) -> tuple[int, str, str]:
    def get() -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    return await asyncio.to_thread(get)


# ------------------------------------------------------------------------------ HTTP side


async def test_health_and_metrics(rig) -> None:
    runtime, server, url = rig
    runtime.add_call("CA1")
    runtime.bus.publish(WebhookReceived(provider="twilio", event_type="sms", summary="hi"))
    runtime.bus.publish(WebhookReceived(provider="twilio", event_type="sms", summary="hi"))
    runtime.bus.publish(WebhookFailed(provider="stripe", event_id="evt_1", error="boom"))
    status, ctype, body = await http_get(server.port, "/health")
    assert status == 200 and ctype == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok" and health["calls"] == 1 and health["node"] == "test-node"
    status, ctype, body = await http_get(server.port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    names = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and not line.startswith("#")}
    assert names and all(n.startswith("xswarm_") for n in names)
    assert "xswarm_calls_open 1.0" in body
    assert 'xswarm_webhooks_received_total{provider="twilio"} 2.0' in body
    assert 'xswarm_webhooks_failed_total{dead="false",provider="stripe"} 1.0' in body
    status, _, _ = await http_get(server.port, "/nope")
    assert status == 404


# ---------------------------------------------------------------------------------- auth


async def test_no_token_is_closed_4401(rig) -> None:
    runtime, server, url = rig
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
        assert ws.close_code == p.CLOSE_UNAUTHORIZED
    rows = await audit_rows(runtime, action="connect")
    assert rows and rows[0].result.startswith("error") and rows[0].detail == {"address": "127.0.0.1"}


async def test_wrong_token_header_is_401_and_message_is_4401(rig) -> None:
    runtime, server, url = rig
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers={"Authorization": "Bearer not-the-token"}):
            pass
    assert info.value.response.status_code == 401
    async with connect(url) as ws:
        await ws.send(json.dumps({"v": 1, "type": "auth", "token": "wrong"}))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
        assert ws.close_code == p.CLOSE_UNAUTHORIZED
    assert [r.result for r in await audit_rows(runtime, action="connect")] == ["error: bad token"] * 2


async def test_auth_message_gets_snapshot_first(rig) -> None:
    runtime, server, url = rig
    runtime.add_call("CA1")
    async with connect(url) as ws:
        await ws.send(json.dumps({"v": 1, "type": "auth", "token": MONITOR, "name": "eve"}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 3))
    assert first["type"] == "snapshot" and first["v"] == 1
    assert first["you"]["role"] == "monitor" and first["you"]["actor"].startswith("eve#")
    assert [c["call_id"] for c in first["calls"]] == ["CA1"]


async def test_five_wrong_tokens_never_lock_out_the_operator(rig) -> None:
    """Contract (issue 13): after five wrong tokens from 127.0.0.1 the valid operator token
    still connects. Behind a tunnel every console is 127.0.0.1, so a lockout per address alone
    let anyone lock the operator out."""
    runtime, server, url = rig
    for _ in range(5):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers={"Authorization": "Bearer guess"}):
                pass
        assert info.value.response.status_code == 401
    async with connect(url, additional_headers={"Authorization": f"Bearer {OPERATOR}"}) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 3))
        assert first["you"]["role"] == "operator"
    async with connect(url) as ws:  # and through the auth message
        await ws.send(json.dumps({"v": 1, "type": "auth", "token": OPERATOR}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 3))["you"]["role"] == "operator"


async def test_a_repeated_wrong_token_is_rate_limited(rig) -> None:
    runtime, server, url = rig
    for _ in range(5):
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers={"Authorization": "Bearer guess"}):
                pass
        assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:  # the same wrong token, while the window lasts
        async with connect(url, additional_headers={"Authorization": "Bearer guess"}):
            pass
    assert info.value.response.status_code == 429
    async with connect(url) as ws:  # the auth message is refused the same way
        await ws.send(json.dumps({"v": 1, "type": "auth", "token": "guess"}))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
        assert ws.close_code == p.CLOSE_RATE_LIMITED
    _, _, body = await http_get(server.port, "/metrics")
    assert 'xswarm_supervisor_auth_failures_total{reason="rate_limited"} 2.0' in body
    assert 'xswarm_supervisor_auth_failures_total{reason="bad_token"} 5.0' in body


def test_a_monitor_login_does_not_reset_the_failure_count() -> None:
    """Issue 13: any successful login cleared the count, so a monitor could guess the operator
    token without limit by logging in between guesses."""
    auth = Authenticator(Tokens(OPERATOR, MONITOR, {}), max_failures=5, window_s=60, max_total_failures=1000)
    for _ in range(5):
        assert auth.check("10.0.0.9", "operator-guess", now=1.0) == (None, "bad_token")
        assert auth.check("10.0.0.9", MONITOR, now=1.0) == ("monitor", None)
    assert auth.check("10.0.0.9", "operator-guess", now=1.0) == (None, "rate_limited")
    assert auth.check("10.0.0.9", OPERATOR, now=1.0) == ("operator", None)
    assert auth.check("10.0.0.9", "operator-guess", now=62.0) == (None, "bad_token")  # the window moved on


def test_failures_have_a_global_cap() -> None:
    """Guesses spread over many tokens and addresses: past the cap every failure is answered
    429 (and no longer audited one by one), while the real tokens still get in."""
    auth = Authenticator(Tokens(OPERATOR, MONITOR, {}), max_failures=5, window_s=60, max_total_failures=20)
    for i in range(20):
        assert auth.check(f"10.0.0.{i}", f"guess-{i}", now=1.0) == (None, "bad_token")
    assert auth.check("10.9.9.9", "fresh-guess", now=1.0) == (None, "rate_limited")
    assert auth.check("10.9.9.9", OPERATOR, now=1.0) == ("operator", None)
    assert auth.check("10.9.9.9", None, now=1.0) == (None, "rate_limited")


def test_tokens_generated_once_with_0600(xswarm_home: Path) -> None:
    settings = load_settings()
    first = load_tokens(settings)
    path = token_file()
    assert path.name == TOKEN_FILE and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.operator != first.monitor and len(first.operator) >= 32
    assert load_tokens(settings) == first  # stable across restarts
    os.environ["XSWARM_SUPERVISOR_TOKEN"] = "from-the-environment-0123"
    try:
        override = load_tokens(load_settings())
    finally:
        del os.environ["XSWARM_SUPERVISOR_TOKEN"]
    assert override.operator == "from-the-environment-0123" and override.monitor == first.monitor
    assert override.source["operator"] == "settings"


def test_cli_prints_a_token_only_when_asked(xswarm_home: Path) -> None:
    from typer.testing import CliRunner

    from xswarm_tui.cli import app

    runner = CliRunner()
    operator = runner.invoke(app, ["supervisor", "token"])
    monitor = runner.invoke(app, ["supervisor", "token", "--monitor"])
    where = runner.invoke(app, ["supervisor", "token", "--where"])
    assert operator.exit_code == monitor.exit_code == where.exit_code == 0, operator.output
    tokens = load_tokens(load_settings())
    assert operator.stdout.strip() == tokens.operator and monitor.stdout.strip() == tokens.monitor
    assert where.stdout.strip() == str(token_file()) and tokens.operator not in where.stdout
    token_file().write_text("{}")
    broken = runner.invoke(app, ["supervisor", "token"])
    assert broken.exit_code == 1 and "delete it to regenerate" in broken.output


# ------------------------------------------------------------------------------ commands


async def test_monitor_can_listen_but_not_act(rig) -> None:
    runtime, server, url = rig
    call = runtime.add_call("CA1")
    async with SupervisorClient(url, MONITOR, name="watcher") as mon:
        assert mon.role == "monitor"
        for command in (TakeOver("CA1"), Mute("CA1"), Whisper("CA1", "hi"), HangUp("CA1"), Transfer("CA1")):
            with pytest.raises(CommandError) as info:
                await mon.command(command)
            assert info.value.code == "forbidden"
        assert call.mode == "ai" and not call.pending_text and not call.ended
        await mon.command(Listen("CA1"))
        assert len(call.taps) == 1
        await mon.command(Unlisten("CA1"))
        assert call.taps == []
    rows = await audit_rows(runtime, call_id="CA1")
    assert [r.action for r in reversed(rows)] == [
        "takeover",
        "mute",
        "whisper",
        "hangup",
        "transfer",
        "listen",
        "unlisten",
    ]
    assert all(r.result.startswith("error") for r in rows[2:]) and rows[0].result == "ok"
    assert {r.role for r in rows} == {"monitor"}


async def test_operator_controls_reach_the_call(rig) -> None:
    runtime, server, url = rig
    call = runtime.add_call("CA1")
    async with SupervisorClient(url, OPERATOR, name="alice") as op:
        answer = await op.command(Mute("CA1"))
        assert answer["type"] == "ok" and answer["mode"] == "muted" and answer["id"]
        await op.command(Unmute("CA1"))
        await op.command(Whisper("CA1", "offer a refund"))
        assert call.take_forced_text() == "offer a refund"
        with pytest.raises(CommandError) as info:
            await op.command(Whisper("CA2", "x"))
        assert info.value.code == "not_found"
        await op.command(HangUp("CA1"))
        assert call.ended and call.transport.hung_up.startswith("hung up by alice#")
        acted = await next_of(op, SupervisorActed, where=lambda e: e.action == "hangup")
        assert acted.result == "ok" and acted.actor == op.actor


async def test_two_supervisors_takeover_is_exclusive(rig) -> None:
    runtime, server, url = rig
    call = runtime.add_call("CA1")
    async with SupervisorClient(url, OPERATOR, name="alice") as a, SupervisorClient(url, OPERATOR2, name="bob") as b:
        await a.command(TakeOver("CA1"))
        seen = await next_of(b, CallUpdated, where=lambda e: e.mode == "operator")
        assert seen.operator == a.actor and call.operator == a.actor
        with pytest.raises(CommandError) as info:
            await b.command(TakeOver("CA1"))
        assert info.value.code == "conflict" and info.value.answer["operator"] == a.actor
        with pytest.raises(CommandError):
            await b.command(HandBack("CA1"))
        # bob's audio is refused, alice's reaches the call
        await b.send_audio("CA1", np.full(1920, 0.5, np.float32))
        err = await asyncio.wait_for(_error_frame(b), 3)
        assert "take over CA1" in err
        await a.send_audio("CA1", np.full(1920, 0.25, np.float32))
        await _until(lambda: len(call.operator_audio) == 1920)
        frame = call.operator_audio.pop()
        assert np.allclose(frame, 0.25, atol=1e-4)
        await a.command(HandBack("CA1"))
        assert call.mode == "ai"
        await b.command(TakeOver("CA1"))
        assert call.operator == b.actor


async def test_operator_audio_as_opus(rig) -> None:
    runtime, server, url = rig
    if not p.opus_available():
        pytest.skip("sphn is not installed")
    call = runtime.add_call("CA1")
    async with SupervisorClient(url, OPERATOR) as op:
        await op.command(TakeOver("CA1"))
        tone = (0.4 * np.sin(2 * np.pi * 300 * np.arange(1920 * 5) / 24000)).astype(np.float32)
        for i in range(5):
            await op.send_audio("CA1", tone[i * 1920 : (i + 1) * 1920], codec="opus")
        await _until(lambda: len(call.operator_audio) >= 1920 * 4)
        frames = [call.operator_audio.pop() for _ in range(4)]
    assert np.sqrt(np.mean(np.concatenate(frames[1:]) ** 2)) > 0.15  # the tone, decoded


async def test_dropped_socket_hands_back(rig) -> None:
    runtime, server, url = rig
    call = runtime.add_call("CA1")
    async with SupervisorClient(url, OPERATOR, name="bob") as watcher:
        a = SupervisorClient(url, OPERATOR, name="alice")
        await a.start()
        await a.command(TakeOver("CA1"))
        await a.command(Listen("CA1"))
        assert call.operator == a.actor and len(call.taps) == 1
        a._ws.transport.abort()  # the network drops: no close frame
        back = await next_of(watcher, CallUpdated, where=lambda e: e.mode == "ai")
        assert back.operator is None and call.mode == "ai"
        await _until(lambda: call.taps == [])
        await a.close()
    auto = [r for r in await audit_rows(runtime, action="handback") if r.detail and r.detail.get("automatic")]
    assert len(auto) == 1 and auto[0].result == "ok"


async def test_listen_streams_both_directions_live(rig) -> None:
    runtime, server, url = rig
    call = runtime.add_call("CA1")
    async with SupervisorClient(url, MONITOR) as mon:
        await mon.command(Listen("CA1"))
        tone = np.sin(np.arange(1920) / 10).astype(np.float32) * 0.5
        delays = []
        for _ in range(10):
            for tap in list(call.taps):  # what the scheduler does each tick
                tap("caller", tone)
                tap("ai", -tone)
            got = [await mon.next_audio(2), await mon.next_audio(2)]
            assert {g.direction for g in got} == {"caller", "ai"}
            caller = next(g for g in got if g.direction == "caller")
            assert np.allclose(caller.pcm, tone, atol=1e-4)
            delays.extend(g.delay_s for g in got)
            await asyncio.sleep(0.08)
        assert max(delays) < 0.15, delays  # loopback, no load: well inside the 150 ms budget


async def test_listen_opus(rig) -> None:
    runtime, server, url = rig
    if not p.opus_available():
        pytest.skip("sphn is not installed")
    call = runtime.add_call("CA1")
    async with SupervisorClient(url, MONITOR) as mon:
        await mon.command(Listen("CA1"), codec="opus")
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(1920 * 6) / 24000)).astype(np.float32)
        pcm = []
        for i in range(6):
            for tap in list(call.taps):
                tap("caller", tone[i * 1920 : (i + 1) * 1920])
            frame = await mon.next_audio(2)
            assert frame.direction == "caller" and frame.seq == i
            pcm.append(frame.pcm)
        out = np.concatenate(pcm)
        assert out.size == tone.size and np.sqrt(np.mean(out[1920:] ** 2)) > 0.1  # a real tone came through


async def test_listeners_share_one_encoding_per_stream(rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three listeners of one call (two PCM16, one Opus when available): each frame is encoded
    once per direction and codec, and every PCM16 listener gets the same frame (same seq, same
    capture stamp). A stream lives while someone listens: the last one leaving ends it."""
    runtime, server, url = rig
    call = runtime.add_call("CA1")
    packed: list[tuple[str, str]] = []
    pack = p.AudioStream.pack

    def counting_pack(self: p.AudioStream, pcm: np.ndarray) -> bytes:
        packed.append((self.direction, self.codec))
        return pack(self, pcm)

    monkeypatch.setattr(p.AudioStream, "pack", counting_pack)
    opus = p.opus_available()
    tone = np.sin(np.arange(1920) / 10).astype(np.float32) * 0.5

    def tick() -> None:
        for tap in list(call.taps):  # what the scheduler does: the same arrays for every tap
            tap("caller", tone)
            tap("ai", tone)

    async with (
        SupervisorClient(url, MONITOR) as a,
        SupervisorClient(url, OPERATOR) as b,
        SupervisorClient(url, MONITOR) as c,
    ):
        await a.command(Listen("CA1"))
        await b.command(Listen("CA1"))
        if opus:
            await c.command(Listen("CA1"), codec="opus")
        for _ in range(3):
            tick()
            await asyncio.sleep(0.01)  # ticks are 80 ms apart: the loop runs in between
        codecs = 2 if opus else 1
        assert sorted(packed) == sorted(
            [(d, codec) for d in ("caller", "ai") for codec in ("pcm16", "opus")[:codecs]] * 3
        )
        got_a = [await a.next_audio(2) for _ in range(6)]
        got_b = [await b.next_audio(2) for _ in range(6)]
        key = lambda f: (f.direction, f.seq, f.captured_at)  # noqa: E731
        assert sorted(map(key, got_a)) == sorted(map(key, got_b))
        assert sorted(f.seq for f in got_a if f.direction == "caller") == [0, 1, 2]
        await a.command(Unlisten("CA1"))
        await b.command(Unlisten("CA1"))
        assert {k[2] for k in server._streams} == ({"opus"} if opus else set())
        await b.command(Listen("CA1"))  # the PCM16 stream had no listener left: it starts again
        tick()
        again = await b.next_audio(2)
        assert again.seq == 0


async def test_latency_samples_coalesced_to_4hz(rig) -> None:
    runtime, server, url = rig
    runtime.add_call("CA1")
    runtime.add_call("CA2")
    async with SupervisorClient(url, MONITOR) as mon:
        for i in range(20):  # a burst: the first leaves at once, the newest 250 ms later
            runtime.bus.publish(LatencySampled(call_id="CA1", step_ms=float(i)))
        runtime.bus.publish(LatencySampled(call_id="CA2", step_ms=99.0))  # another call: its own budget
        got = []
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            try:
                got.append(await next_of(mon, LatencySampled, timeout=0.1))
            except TimeoutError:
                pass
    assert [(e.call_id, e.step_ms) for e in got] == [("CA1", 0.0), ("CA2", 99.0), ("CA1", 19.0)]
    assert got[2].at - got[0].at < 0.05  # the event keeps its own time; only delivery waited


async def test_malformed_frames_get_errors_and_others_are_fine(rig) -> None:
    runtime, server, url = rig
    runtime.add_call("CA1")
    async with SupervisorClient(url, OPERATOR, name="good") as good:
        async with connect(url, additional_headers={"Authorization": f"Bearer {OPERATOR}"}, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "snapshot"
            cases = [
                ("{not json", None, "not valid JSON"),
                (json.dumps({"v": 1, "type": "Explode", "id": "u1"}), "u1", "unknown message type"),
                (json.dumps({"v": 2, "type": "mute", "id": 7, "call_id": "CA1"}), 7, "unsupported protocol version"),
                (json.dumps({"v": 1, "type": "mute", "id": "m1"}), "m1", "missing fields"),
                (
                    json.dumps({"v": 1, "type": "mute", "id": "m2", "call_id": "CA1", "extra": 1}),
                    "m2",
                    "unknown fields",
                ),
                (json.dumps({"v": 1, "type": "listen", "id": "l1", "call_id": "CA1", "codec": "mp3"}), "l1", "codec"),
                (
                    json.dumps({"v": 1, "type": "whisper", "id": "w1", "call_id": "CA1", "text": "x" * 70000}),
                    None,
                    "limit",
                ),
            ]
            for raw, msg_id, words in cases:
                await ws.send(raw)
                answer = await _next_answer(ws)
                assert answer["type"] == "error" and answer["id"] == msg_id and words in answer["error"], (
                    raw[:60],
                    answer,
                )
            await ws.send(b"\x01\x02")  # a binary frame shorter than its header
            answer = await _next_answer(ws)
            assert answer["code"] == "bad_audio"
            await ws.send(json.dumps({"v": 1, "type": "ping", "id": "still-here"}))
            assert (await _next_answer(ws))["type"] == "pong"
            await ws.send("x" * (p.MAX_FRAME_BYTES + 10))  # past the frame limit: only this socket closes
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 3)
            assert ws.close_code == 1009
        assert await good.ping() < 1.0
        await good.command(Mute("CA1"))


async def test_command_flood_is_rate_limited(rig) -> None:
    runtime, server, url = rig
    runtime.add_call("CA1")
    async with connect(url, additional_headers={"Authorization": f"Bearer {OPERATOR}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
        for i in range(80):
            await ws.send(json.dumps({"v": 1, "type": "unmute", "id": i, "call_id": "CA1"}))
        answers = [await _next_answer(ws) for _ in range(80)]
    codes = [a.get("code", "ok") for a in answers]
    assert sorted(a["id"] for a in answers) == list(range(80))
    assert codes.count("rate_limited") >= 20 and codes.count("ok") >= 40
    assert len(await audit_rows(runtime, action="unmute")) == codes.count("ok")


async def test_never_reading_supervisor_is_disconnected_not_waited_for(rig) -> None:
    runtime, server, url = rig
    n_events = server_mod.MAX_QUEUED_EVENTS + 500
    call = runtime.add_call("CA1")
    async with SupervisorClient(url, MONITOR, name="good") as good:
        stuck = await connect_stuck(url, MONITOR)
        await stuck.send(json.dumps({"v": 1, "type": "listen", "id": 1, "call_id": "CA1"}))
        await asyncio.sleep(0.1)
        publish_s = []
        pad = "x" * 500
        for i in range(n_events):
            t0 = time.perf_counter()
            runtime.bus.publish(WebhookReceived(provider="twilio", event_type="sms", summary=f"{i} {pad}"))
            for tap in list(call.taps):
                tap("caller", np.zeros(1920, np.float32))
            publish_s.append(time.perf_counter() - t0)
            if i % 50 == 0:
                await asyncio.sleep(0)
        await _until(lambda: stuck.state.name == "CLOSED" or server.client_count == 1, timeout=15)
        assert server.client_count == 1  # only the good one is left
        assert np.median(publish_s) < 0.002 and sum(publish_s) < 2.0  # never waited on the stuck socket
        last = await next_of(
            good, WebhookReceived, timeout=10, where=lambda e: e.summary.startswith(f"{n_events - 1} ")
        )
        assert last.provider == "twilio"
        stuck.transport.abort()  # a stuck client never reads the close handshake
    _, _, body = await http_get(server.port, "/metrics")
    assert "xswarm_supervisor_slow_disconnects_total 1.0" in body
    assert 'xswarm_supervisor_dropped_total{kind="audio"}' in body


async def test_system_figures_come_from_the_runtimes_sampler(rig) -> None:
    """The server does not sample on its own: the first snapshot gets a one-off sample when the
    runtime's sampler has not published yet; after that, figures are the bus's."""
    runtime, server, url = rig
    async with SupervisorClient(url, MONITOR) as mon:
        first = mon.snapshot["system"]
        assert first["ram_total_bytes"] > 0 and (first["gpus"] or first["gpu_reason"])  # from the start
        with pytest.raises(TimeoutError):  # no sampler of its own
            await next_of(mon, SystemSampled, timeout=1.5)
        runtime.bus.publish(SystemSampled(cpu_percent=12.5, ram_used_bytes=1, ram_total_bytes=2))
        sample = await next_of(mon, SystemSampled, timeout=3)
        assert (sample.cpu_percent, sample.ram_total_bytes) == (12.5, 2)
    async with SupervisorClient(url, MONITOR) as mon:
        assert mon.snapshot["system"]["cpu_percent"] == 12.5  # the bus's newest, not a new sample


# ------------------------------------------------------------------------------ transfer


async def test_transfer_redirects_through_twilio_rest(xswarm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    async def calls_update(request: web.Request) -> web.Response:
        if request.match_info["sid"] == "CAGONE":
            return web.json_response({"code": 20404, "message": "The requested resource was not found"}, status=404)
        form = await request.post()
        seen.append({"path": request.path, "auth": request.headers.get("Authorization"), "twiml": form.get("Twiml")})
        return web.json_response({"sid": request.match_info["sid"], "status": "in-progress"})

    runner, port = await start_local_app(web.post("/2010-04-01/Accounts/{account}/Calls/{sid}.json", calls_update))
    settings = load_settings(
        supervisor={"token": OPERATOR, "monitor_token": MONITOR},
        twilio={
            "account_sid": "AC123",
            "auth_token": "secret",
            "transfer_number": "+15557654321",
            "api_base": f"http://127.0.0.1:{port}",
        },
    )
    runtime = StandInRuntime(settings)
    server = SupervisorServer(runtime)
    await server.start("127.0.0.1", 0)
    try:
        runtime.add_call("CA9")
        runtime.add_call("local-1", source="local")
        async with SupervisorClient(f"ws://127.0.0.1:{server.port}/", OPERATOR) as op:
            answer = await op.command(Transfer("CA9"))
            assert answer["type"] == "ok"
            assert (await op.command(Transfer("CA9", to="+15550001111")))["type"] == "ok"  # the console's choice
            with pytest.raises(CommandError) as info:
                await op.command(Transfer("CA9", to="555-0100"))
            assert info.value.code == "invalid" and "E.164" in str(info.value)
            with pytest.raises(CommandError) as info:
                await op.command(Transfer("local-1"))
            assert info.value.code == "unavailable"
            runtime.add_call("CAGONE")
            with pytest.raises(CommandError) as info:
                await op.command(Transfer("CAGONE"))
            assert info.value.code == "failed" and "404" in str(info.value)
        assert seen == [
            {
                "path": "/2010-04-01/Accounts/AC123/Calls/CA9.json",
                "auth": "Basic QUMxMjM6c2VjcmV0",
                "twiml": "<Response><Dial>+15557654321</Dial></Response>",
            },
            {
                "path": "/2010-04-01/Accounts/AC123/Calls/CA9.json",
                "auth": "Basic QUMxMjM6c2VjcmV0",
                "twiml": "<Response><Dial>+15550001111</Dial></Response>",
            },
        ]
        rows = await audit_rows(runtime, action="transfer")
        assert [(r.call_id, r.result[:5]) for r in reversed(rows)] == [
            ("CA9", "ok"),
            ("CA9", "ok"),
            ("CA9", "error"),
            ("local-1", "error"),
            ("CAGONE", "error"),
        ]
        assert rows[-1].detail == {"to": "+15557654321"}
    finally:
        await server.stop()
        runtime.close()
        await runner.cleanup()


# -------------------------------------------------------------------------------- client


async def test_client_reconnects_from_a_fresh_snapshot(settings: Settings) -> None:
    runtime = StandInRuntime(settings)
    server = SupervisorServer(runtime)
    await server.start("127.0.0.1", 0)
    port = server.port
    client = SupervisorClient(f"ws://127.0.0.1:{port}/", OPERATOR, backoff_s=(0.05, 0.2))
    try:
        await client.start()
        assert isinstance(await client.next_message(2), Snapshot)
        runtime.add_call("CA1")
        await client.command(Listen("CA1"))
        await server.stop()
        server = SupervisorServer(runtime)
        await server.start("127.0.0.1", port)
        snap = await next_of(client, Snapshot, timeout=5)
        assert [c["call_id"] for c in snap.data["calls"]] == ["CA1"] and client.reconnects >= 1
        await _until(lambda: len(runtime.calls.get("CA1").taps) == 1)  # listening again by itself
    finally:
        await client.close()
        await server.stop()
        runtime.close()


async def test_port_in_use_fails_cleanly(rig) -> None:
    runtime, server, url = rig
    second = SupervisorServer(runtime)
    with pytest.raises(OSError):
        await second.start("127.0.0.1", server.port)
    async with SupervisorClient(url, MONITOR):  # the first server is unaffected
        pass


async def test_client_bad_token_raises_auth_error(rig) -> None:
    _, _, url = rig
    with pytest.raises(AuthError):
        async with SupervisorClient(url, "wrong-token"):
            pass
    with pytest.raises(AuthError):
        async with SupervisorClient(url, "wrong-token", header_auth=False):
            pass


# ------------------------------------------------------------------------------- helpers


async def connect_stuck(url: str, token: str) -> ClientConnection:
    """A supervisor that never reads: websockets stops reading the socket once ``max_queue``
    messages wait, and a 4 KiB receive buffer makes TCP push back on the server at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return await connect(
        url, sock=sock, additional_headers={"Authorization": f"Bearer {token}"}, max_queue=1, compression=None
    )


async def _until(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def _next_answer(ws) -> dict[str, Any]:
    """The next ok/error/pong frame on a raw socket (events are skipped)."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), 3)
        if isinstance(raw, str):
            data = json.loads(raw)
            if data["type"] in ("ok", "error", "pong"):
                return data


async def _error_frame(client: SupervisorClient) -> str:
    while client.last_error is None:
        await asyncio.sleep(0.01)
    return client.last_error
