"""The operator records commands (`xswarm calls|messages|audit|recordings`) over a real database.

The end-to-end test places a phone call the way Twilio does (the bridge simulator, signed
upgrade, one-time token) into a real echo runtime with recording on, lets it end, and then
reads it back with the commands an operator types.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from local_http import start_local_app
from typer.testing import CliRunner

from engine.audio import mulaw
from engine.bridge.simulator import StreamTarget, stream_call
from engine.config import load_settings
from engine.store import audit, messages
from engine.store.migrations import open_database
from engine.telephony.calltoken import Claims, mint
from xswarm_tui.cli import app
from xswarm_tui.commands.records import parse_since

runner = CliRunner()
CALLER = "+15551230001"


def xswarm(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def as_json(*args: str) -> Any:
    result = xswarm(*args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_version() -> None:
    result = xswarm("--version")
    assert result.exit_code == 0 and result.stdout.strip() == "xswarm 0.1.0"


def test_every_list_is_an_empty_json_list_on_an_empty_database() -> None:
    for group in ("calls", "messages", "audit", "recordings"):
        assert as_json(group, "list", "--json") == []
    assert "no calls yet" in xswarm("calls", "list").stdout


def test_bad_input_is_one_line_and_exit_2() -> None:
    result = xswarm("audit", "list", "--since", "yesterday")
    assert result.exit_code == 2 and "neither an age" in result.stderr
    result = xswarm("messages", "list", "--kind", "fax")
    assert result.exit_code == 2 and "sms, email or voicemail" in result.stderr
    missing = xswarm("calls", "show", "CA-none")
    assert missing.exit_code == 1 and "no call 'CA-none'" in missing.stderr
    assert xswarm("recordings", "get", "CA-none", "--to", "x.wav").exit_code == 1


def test_since_reads_ages_and_iso_dates() -> None:
    now = 1_800_000_000.0
    assert parse_since("30m", now) == (now - 1800) * 1000
    assert parse_since("2d", now) == (now - 2 * 86400) * 1000
    assert parse_since("2026-12-01") == 1_796_083_200_000  # midnight UTC
    assert parse_since("2026-12-01T01:00+01:00") == 1_796_083_200_000


def test_messages_and_audit_filters_on_a_real_database() -> None:
    db = open_database(load_settings())
    try:
        day = 1_796_083_200_000
        for i, (channel, provider_id) in enumerate((("sms", "SM1"), ("email", "em1"), ("voicemail", "RE1"))):
            db.submit(
                *messages.insert_statement(
                    channel=channel,  # type: ignore[arg-type]
                    direction="in",
                    provider_id=provider_id,
                    user_id="u-1",
                    from_addr="+15550100999" if channel != "email" else "ada@example.com",
                    to_addr="+15550100000",
                    body=f"{channel} body",
                    status="received",
                    meta={"recording_url": "https://api.twilio.com/x/RE1", "duration_s": "7"}
                    if channel == "voicemail"
                    else None,
                    at_ms=day + i * 1000,
                )
            ).result()
        audit.record(
            db, actor="ann@desk", role="operator", action="listen", result="ok", call_id="CA1", at=1.0
        ).result()
        audit.record(db, actor="bob@desk", role="operator", action="hangup", result="ok", call_id="CA1").result()
    finally:
        db.close()
    listed = as_json("messages", "list", "--json")
    assert [m["kind"] for m in listed] == ["voicemail", "email", "sms"]  # newest first
    assert listed[0]["from"] != "+15550100999" and listed[0]["from"].endswith("0999")  # masked
    assert as_json("messages", "list", "--json", "--reveal")[0]["from"] == "+15550100999"
    assert [m["kind"] for m in as_json("messages", "list", "--json", "--kind", "sms")] == ["sms"]
    assert "7 s of audio" in xswarm("messages", "list", "--kind", "voicemail").stdout
    entries = as_json("audit", "list", "--json")
    assert [(e["actor"], e["action"]) for e in entries] == [("bob@desk", "hangup"), ("ann@desk", "listen")]
    assert [e["actor"] for e in as_json("audit", "list", "--json", "--since", "1h")] == ["bob@desk"]


def test_voicemail_audio_is_fetched_by_its_recording_sid_from_the_twilio_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored RecordingUrl came over the internet: it is never fetched. The audio comes
    from the configured API host by the RecordingSid, with the account's credentials."""
    seen: list[str] = []
    evil: list[str] = []

    async def recording(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(body=b"RIFF....WAVEfake", content_type="audio/x-wav")

    async def elsewhere(request: web.Request) -> web.Response:
        evil.append(request.headers.get("Authorization", ""))
        return web.Response(body=b"not from twilio")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(
        start_local_app(
            web.get("/2010-04-01/Accounts/AC1/Recordings/RE9.wav", recording),
            web.get("/evil/{tail:.*}", elsewhere),
        ),
        loop,
    ).result(10)
    try:
        base = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("XSWARM_TWILIO__API_BASE", base)
        monkeypatch.setenv("XSWARM_TWILIO__ACCOUNT_SID", "AC1")
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", "voicemail-test-token")
        db = open_database(load_settings())
        try:
            for sid in ("RE9", "CA1:voicemail"):  # the second: Twilio sent no RecordingSid
                db.submit(
                    *messages.insert_statement(
                        channel="voicemail",
                        direction="in",
                        provider_id=sid,
                        user_id=None,
                        from_addr="+15550100999",
                        to_addr=None,
                        body=None,
                        status="received",
                        meta={"recording_url": f"{base}/evil/{sid}"},
                    )
                ).result()
        finally:
            db.close()
        out = tmp_path / "vm.wav"
        result = xswarm("messages", "audio", "RE9", "--to", str(out))
        assert result.exit_code == 0, result.stderr
        assert out.read_bytes() == b"RIFF....WAVEfake" and seen and seen[0].startswith("Basic ")
        refused = xswarm("messages", "audio", "CA1:voicemail", "--to", str(tmp_path / "none.wav"))
        assert refused.exit_code == 1 and "not a Twilio RecordingSid" in refused.stderr
        assert not (tmp_path / "none.wav").exists() and len(seen) == 1 and evil == []
        assert list(tmp_path.glob(".*.part")) == []
    finally:
        asyncio.run_coroutine_threadsafe(server.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_a_real_call_is_listed_shown_and_its_recording_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tui_support import free_port

    from engine.runtime import Runtime
    from engine.store.users import create_user, set_recording_consent

    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "auth-token-for-records-test")
    monkeypatch.setenv("XSWARM_CALL_TOKEN_SECRET", "call-token-secret-for-records-test")
    monkeypatch.setenv("XSWARM_RECORDING__ENABLED", "true")
    monkeypatch.setenv("XSWARM_SERVER__NODE_ID", "node-a")
    runtime = Runtime(load_settings(), model_spec="echo", bridge_port=free_port(), supervisor_port=0, webhooks_port=0)
    runtime.start()
    call_sid = "CA" + "4" * 32
    try:
        assert runtime.db is not None
        user = create_user(runtime.db, name="Ada", phone=CALLER, email="ada@example.com")
        set_recording_consent(runtime.db, user.id, True)
        deadline = time.time() + 30
        while runtime.model is None and time.time() < deadline:
            time.sleep(0.02)
        audit.record(runtime.db, actor="ann@desk", role="operator", action="listen", result="ok", call_id=call_sid)
        t = np.arange(8000 * 2) / 8000
        audio = mulaw.encode((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)).tobytes()
        target = StreamTarget(
            f"ws://127.0.0.1:{runtime.bridge_port}/twilio",
            {
                "token": mint(
                    "call-token-secret-for-records-test", call_sid, claims=Claims(user_id=user.id, caller=CALLER)
                )
            },
        )
        asyncio.run(stream_call(target, audio, auth_token="auth-token-for-records-test", call_sid=call_sid))
        deadline = time.time() + 15
        while not any(r.call_sid == call_sid for r in _recordings()) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        runtime.stop()
    calls = as_json("calls", "list", "--json", "--reveal")
    assert [c["call_sid"] for c in calls] == [call_sid]
    call = calls[0]
    assert call["caller"] == CALLER and call["user_id"] == user.id and call["node_id"] == "node-a"
    assert call["started_at"].endswith("Z") and call["ended_at"] >= call["started_at"]
    assert call["duration_s"] > 1.5 and call["end_reason"]
    assert as_json("calls", "list", "--json")[0]["caller"] != CALLER  # masked without --reveal
    assert as_json("calls", "list", "--json", "--user", CALLER)[0]["call_sid"] == call_sid
    assert as_json("calls", "list", "--json", "--user", "u-nobody") == []
    assert as_json("calls", "list", "--json", "--since", "2099-01-01") == []
    shown = as_json("calls", "show", call_sid, "--json", "--reveal")
    assert shown["listened"] == ["ann@desk"] and shown["recording"]["key"].endswith(f"{call_sid}.wav")
    text = xswarm("calls", "show", call_sid).stdout
    assert "listened    ann@desk" in text and "recording   recordings/" in text and CALLER not in text
    (listed,) = as_json("recordings", "list", "--json")
    assert listed["call_sid"] == call_sid and listed["transcript"] is True
    out = tmp_path / "call.wav"
    result = xswarm("recordings", "get", call_sid, "--to", str(out))
    assert result.exit_code == 0, result.stderr
    with wave.open(str(out)) as wav:
        assert wav.getnchannels() == 2 and wav.getnframes() > 24_000
    monkeypatch.setenv("XSWARM_S3__ENDPOINT_URL", "http://127.0.0.1:9")  # a store that cannot be opened
    unstored = xswarm("calls", "show", call_sid)
    assert unstored.exit_code == 0, unstored.stderr  # the call is still shown, with why there is no recording
    assert (
        "listened    ann@desk" in unstored.stdout and "recording   unknown: XSWARM_S3_ENDPOINT_URL" in unstored.stdout
    )


def _recordings() -> list[Any]:
    from engine.storage import open_store
    from engine.storage.recordings import list_recordings

    return list_recordings(open_store(load_settings()))


def test_a_short_supervisor_token_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """`config show` and `serve` refuse it at load, as every other bad setting (no traceback)."""
    monkeypatch.setenv("XSWARM_SUPERVISOR_TOKEN", "1234567890123")
    for args in (("config", "show"), ("serve", "--model", "echo")):
        result = xswarm(*args)
        assert result.exit_code == 2, result.output
        assert (
            result.stderr.count("\n") == 1 and "supervisor.token" in result.stderr and "16 characters" in result.stderr
        )


def test_users_set_theme_chooses_the_persona() -> None:
    added = as_json("users", "add", "--name", "Ada", "--phone", "+15550100123", "--email", "ada@example.com", "--json")
    result = xswarm("users", "set-theme", "+15550100123", "kitt")
    assert result.exit_code == 0 and result.stdout.strip() == f"{added['id']}: theme xswarm -> kitt"
    assert as_json("users", "show", added["id"], "--json")["theme"] == "kitt"
    bad = xswarm("users", "set-theme", added["id"], "nope")
    assert bad.exit_code == 2 and "unknown theme 'nope'" in bad.stderr and "kitt" in bad.stderr
    assert xswarm("users", "set-theme", "u-missing", "kitt").exit_code == 1


def test_xswarm_call_says_what_it_is_doing_before_the_call_ends() -> None:
    """It used to print nothing until the call was over; now one line on stderr first."""
    from tui_support import free_port

    result = xswarm("call", "--bridge", f"ws://127.0.0.1:{free_port()}/twilio", "--tail", "0")
    assert result.exit_code == 1  # nothing listens there
    assert result.stderr.startswith("calling ws://127.0.0.1:") and "1 call(s), 3.0 s of audio each" in result.stderr


def test_doctor_sees_a_port_in_time_wait_as_free() -> None:
    """After xswarm stops, its ports linger in TIME_WAIT; servers bind them (SO_REUSEADDR), so
    the doctor must not call them busy for a minute."""
    import socket

    from engine.doctor.probes import port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers (the bridge) do
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    server.close()
    assert port_free("127.0.0.1", port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert not port_free("127.0.0.1", busy.getsockname()[1])


def test_the_contract_a_call_through_the_signed_voice_webhook_lists_its_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's contract, end to end: `xswarm call --webhooks … --from +15551230001` (a signed
    voice webhook, its TwiML, the bridge), then `xswarm calls list --json --reveal`."""
    from tui_support import free_port

    from engine.runtime import Runtime

    bridge_port, webhooks_port = free_port(), free_port()
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "auth-token-for-records-test")
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "3" * 32)
    monkeypatch.setenv("XSWARM_CALL_TOKEN_SECRET", "call-token-secret-for-records-test")
    monkeypatch.setenv("XSWARM_BRIDGE_PUBLIC_URL", f"ws://127.0.0.1:{bridge_port}")
    monkeypatch.setenv("XSWARM_TELEPHONY__UNKNOWN_CALLERS", "guest")
    runtime = Runtime(
        load_settings(), model_spec="echo", bridge_port=bridge_port, supervisor_port=0, webhooks_port=webhooks_port
    )
    runtime.start()
    try:
        deadline = time.monotonic() + 10
        while runtime.calls.capacity == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # the node row's first heartbeat lands
        placed = xswarm(
            "call",
            "--webhooks",
            f"http://127.0.0.1:{webhooks_port}",
            "--bridge",
            f"ws://127.0.0.1:{bridge_port}",
            "--from",
            CALLER,
            "--tail",
            "0",
        )
        assert placed.exit_code == 0, placed.output
    finally:
        runtime.stop()
    (call,) = as_json("calls", "list", "--json", "--reveal")
    assert call["caller"] == CALLER and call["ended_at"] is not None
