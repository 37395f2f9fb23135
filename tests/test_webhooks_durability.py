"""Webhooks durability: database down → 5xx and nothing lost after it recovers (real sqld,
stopped and restarted), pending work surviving a restart, retries with backoff, dead letters
and the operator's replay through the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import fixtures.sqld as sqld_fixture
import pytest
from typer.testing import CliRunner

from engine.events import EventBus
from engine.store import inbox, messages
from engine.store.db import Database, Target
from engine.store.migrations import migrate
from engine.store.users import create_user
from tests.webhooks_support import (
    TWILIO_TOKEN,
    FakeApi,
    Recorder,
    llm_routes,
    make_settings,
    post,
    serve_cli,
    twilio_post,
    twilio_rest_routes,
    wait_processed,
)
from webhooks.server import WebhooksServer

ALICE = "+14155550101"


def sms(sid: str, body: str = "help") -> dict[str, str]:
    return {"MessageSid": sid, "From": ALICE, "To": "+14155550199", "Body": body, "AccountSid": "AC0123"}


async def send_sms(session: aiohttp.ClientSession, port: int, sid: str, body: str = "help") -> tuple[int, str]:
    payload, headers = twilio_post(sms(sid, body), "/twilio/sms")
    return await post(session, f"http://127.0.0.1:{port}/twilio/sms", payload, headers)


@pytest.mark.sqld
async def test_database_down_answers_5xx_and_nothing_is_lost(sqld: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(sqld.target(), batch_max_wait_ms=1.0).start()
    migrate(db)
    create_user(db, name="Alice", phone=ALICE, email="alice@example.com")
    server = WebhooksServer(make_settings(), db, EventBus())
    await server.start("127.0.0.1", 0)
    assert server.port is not None
    try:
        async with aiohttp.ClientSession() as session:
            assert (await send_sms(session, server.port, "SM1"))[0] == 200
            await wait_processed(db, 1)

            sqld.stop()  # the database goes away
            status, _ = await send_sms(session, server.port, "SM2")
            assert status == 503
            async with session.get(f"http://127.0.0.1:{server.port}/health") as resp:
                assert resp.status == 503

            port = sqld.port  # same data folder, same address: the database comes back
            monkeypatch.setattr(sqld_fixture, "free_port", lambda: port)
            sqld.start()
            for _ in range(50):  # Twilio retries until it gets a 2xx
                status, text = await send_sms(session, server.port, "SM2")
                if status == 200:
                    break
                await asyncio.sleep(0.2)
            assert status == 200 and "<Message>" in text
            rows = await wait_processed(db, 2, timeout=20)
            assert {r.event_id for r in rows} == {"SM1", "SM2"}
            assert messages.get_by_provider_id(db, "SM2") is not None
            async with session.get(f"http://127.0.0.1:{server.port}/health") as resp:
                assert resp.status == 200
    finally:
        await server.stop()
        db.close()


async def test_pending_work_survives_a_restart(tmp_path: Path) -> None:
    db = Database(Target(str(tmp_path / "h.db"))).start()
    migrate(db)
    create_user(db, name="Alice", phone=ALICE, email="alice@example.com")
    settings = make_settings()
    first = WebhooksServer(settings, db, EventBus(), process=False)  # a node that dies before processing
    await first.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            assert (await send_sms(session, first.port or 0, f"SMr{i}"))[0] == 200
    await first.stop()
    assert {r.status for r in inbox.list_rows(db)} == {"pending"}
    second = WebhooksServer(settings, db, EventBus())
    await second.start("127.0.0.1", 0)
    try:
        rows = await wait_processed(db, 3)
        assert len(rows) == 3
        assert db.query("SELECT COUNT(*) FROM messages WHERE direction = 'in'")[0][0] == 3
    finally:
        await second.stop()
        db.close()


async def test_retries_back_off_then_dead_letter_then_cli_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = await FakeApi(behaviour={"delay": 0.4, "text": "Moved it."}).start(llm_routes)
    rest = await FakeApi(behaviour={"status": 500}).start(twilio_rest_routes)
    db_path = tmp_path / "h.db"
    db = Database(Target(str(db_path))).start()
    migrate(db)
    create_user(db, name="Alice", phone=ALICE, email="alice@example.com")
    llm_settings = {
        "provider": "anthropic",
        "anthropic_api_key": "k",
        "anthropic_base_url": llm.url,
        "sms_budget_s": 0.1,
    }
    settings = make_settings(twilio={"api_base": rest.url}, llm=llm_settings)
    bus = EventBus()
    seen = Recorder(bus)
    server = WebhooksServer(settings, db, bus, max_attempts=2)
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            status, text = await send_sms(session, server.port or 0, "SMx", "move my 3pm")
        assert status == 200 and "<Message>" not in text  # too slow: the reply goes out via REST
        failed = await wait_processed(db, 1, status="failed")
        assert failed[0].attempts == 1 and failed[0].next_attempt_at is not None
        assert "500" in (failed[0].last_error or "")
        dead = await wait_processed(db, 1, status="dead", timeout=15)
        assert dead and dead[0].attempts == 2
        assert [e.dead for e in seen.of("WebhookFailed")] == [False, True]
        assert len(rest.requests) == 2
    finally:
        await server.stop()

    env = {
        "XSWARM_DATABASE__PATH": str(db_path),
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "TWILIO_ACCOUNT_SID": "AC0123",
        "XSWARM_TWILIO__API_BASE_URL": rest.url,
        "XSWARM_LLM__PROVIDER": "anthropic",
        "ANTHROPIC_API_KEY": "k",
        "XSWARM_LLM__ANTHROPIC_BASE_URL": llm.url,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from xswarm_tui.commands.webhooks import app

    runner = CliRunner()
    listed = await asyncio.to_thread(runner.invoke, app, ["inbox", "--dead", "--json"])
    assert listed.exit_code == 0, listed.output
    (entry,) = json.loads(listed.output)
    assert entry["id"] == "twilio-sms:SMx" and entry["status"] == "dead" and "500" in entry["last_error"]
    assert "move my 3pm" not in listed.output  # payloads (personal data) are not listed

    rest.behaviour["status"] = 201  # the provider recovered
    replayed = await asyncio.to_thread(runner.invoke, app, ["replay", "twilio-sms:SMx"])
    assert replayed.exit_code == 0, replayed.output
    assert inbox.get(db, "twilio-sms:SMx").status == "done"  # type: ignore[union-attr]
    assert rest.requests[-1]["form"]["Body"] == "Moved it."
    assert messages.get_by_provider_id(db, "reply:SMx") is not None
    again = await asyncio.to_thread(runner.invoke, app, ["replay", "twilio-sms:SMx"])
    assert again.exit_code == 0 and len(rest.requests) == 3  # the reply is recorded: not sent twice
    missing = await asyncio.to_thread(runner.invoke, app, ["replay", "twilio-sms:nope"])
    assert missing.exit_code == 1
    db.close()
    await llm.stop()
    await rest.stop()


def test_serve_command_binds_answers_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`xswarm webhooks serve --host 127.0.0.1 --port N` as a process: health, a signed SMS,
    a clean exit on SIGTERM."""
    import signal
    import time
    import urllib.request

    from fixtures.sqld import free_port

    port = free_port()
    proc = serve_cli(port)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert f"http://127.0.0.1:{port}" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read())["database"] == "ok"
        body, headers = twilio_post(sms("SMcli"), "/twilio/sms")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/twilio/sms", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200 and b"<Response>" in resp.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0


def test_webhooks_never_import_torch_textual_or_models() -> None:
    import subprocess
    import sys

    code = (
        "import sys, webhooks.server, webhooks.app\n"
        "heavy = ('torch', 'textual', 'moshi', 'xswarm_tui')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('engine.models')]\n"
        "import xswarm_tui.commands.webhooks\n"
        "bad += [m for m in sys.modules if m.split('.')[0] in ('torch', 'textual', 'moshi')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_wake_or_a_stop_that_lands_during_a_claim_is_not_lost(tmp_path: Path) -> None:
    """A wake-up (new rows) or ``stop`` that arrives while the processor's claim is in flight
    takes effect at once, not after ``poll_s``: a lost stop held the webhooks server's
    shutdown for a whole poll (or back-off pause)."""
    from webhooks.hub import Hub, Outcome
    from webhooks.processor import InboxProcessor

    db = Database(Target(str(tmp_path / "w.db"))).start()
    migrate(db)
    seen = asyncio.Event()

    async def effect(hub: Any, row: inbox.InboxRow) -> Outcome:
        seen.set()
        return Outcome([], [])

    hub = Hub(make_settings(), db, EventBus())
    processor = InboxProcessor(hub, {"test": effect}, poll_s=60)
    processor.start()
    try:
        await asyncio.sleep(0)  # the loop now awaits its first claim, which finds nothing
        inbox.put(db, "test", "late", "t", "{}").result()  # blocks the loop: the claim's answer waits
        hub.wake()  # as the route does after committing a row
        await asyncio.wait_for(seen.wait(), 10)
    finally:
        await processor.stop()
    again = InboxProcessor(hub, {"test": effect}, poll_s=60)
    again.start()
    await asyncio.sleep(0)  # its first claim is in flight when the stop comes
    await asyncio.wait_for(again.stop(), 10)
    db.close()


async def test_rows_committed_together_one_bad_row_fails_alone(tmp_path: Path) -> None:
    """Rows finishing together share one transaction with merged inserts; when one row's
    statements fail, the others still commit and only that row is retried."""
    from engine.events import WebhookReceived
    from engine.store.db import merge_inserts
    from webhooks.hub import Hub, Outcome
    from webhooks.processor import InboxProcessor

    db = Database(Target(str(tmp_path / "h.db"))).start()
    migrate(db)

    async def effect(hub: Any, row: inbox.InboxRow) -> Outcome:
        note = ("INSERT INTO events (at, type, summary) VALUES (?, ?, ?)", (1, "Note", row.event_id))
        bad = [("INSERT INTO no_such_table (x) VALUES (?)", (1,))] if row.event_id == "bad" else []
        return Outcome(bad, [WebhookReceived("test", "t", row.event_id)], inserts=[note])

    for event_id in ("a", "b", "bad", "c"):
        inbox.put(db, "test", event_id, "t", "{}").result()
    hub = Hub(make_settings(), db, EventBus())
    processor = InboxProcessor(hub, {"test": effect}, max_attempts=3)
    processor.start()
    try:
        done = await wait_processed(db, 3)
        failed = await wait_processed(db, 1, status="failed")
    finally:
        await processor.stop()
    assert sorted(r.event_id for r in done) == ["a", "b", "c"]
    assert failed[0].event_id == "bad" and "no_such_table" in (failed[0].last_error or "")
    notes = db.query("SELECT summary FROM events WHERE type = 'Note' ORDER BY summary")
    assert [n for (n,) in notes] == ["a", "b", "c"]
    merged = merge_inserts([("INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT(a) DO NOTHING", (i, i)) for i in range(3)])
    assert merged == [("INSERT INTO t (a, b) VALUES (?,?),(?,?),(?,?) ON CONFLICT(a) DO NOTHING", (0, 0, 1, 1, 2, 2))]
    db.close()
