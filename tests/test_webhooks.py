"""Webhooks end to end: real aiohttp server on 127.0.0.1, embedded SQLite file, requests signed
with the providers' own SDK helpers, provider APIs faked as local HTTP servers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.events import EventBus
from engine.store import billing, inbox, messages, nodes, usage
from engine.store.db import Database, Target
from engine.store.migrations import migrate
from engine.store.users import create_api_key, create_user, get_user, revoke_api_key, set_stripe_customer
from engine.telephony.calltoken import verify as verify_call_token
from tests.webhooks_support import (
    CALL_SECRET,
    PUBLIC_URL,
    FakeApi,
    Recorder,
    SendGridKey,
    llm_routes,
    make_settings,
    post,
    sendgrid_routes,
    stripe_event,
    stripe_post,
    twilio_post,
    twilio_rest_routes,
    wait_processed,
)
from webhooks import replies, twilio_sms
from webhooks.hub import Hub
from webhooks.limits import RateLimit
from webhooks.server import WebhooksServer

ALICE = "+14155550101"
OUR_NUMBER = "+14155550199"


@pytest.fixture
def db(tmp_path: Path) -> Any:
    database = Database(Target(str(tmp_path / "hooks.db"))).start()
    migrate(database)
    yield database
    database.close()


@pytest.fixture
def alice(db: Database) -> Any:
    return create_user(db, name="Alice", phone=ALICE, email="alice@example.com", tier="personal")


class Harness:
    def __init__(self, server: WebhooksServer, session: aiohttp.ClientSession, bus: EventBus) -> None:
        self.server = server
        self.session = session
        self.recorder = Recorder(bus)
        self.base = f"http://127.0.0.1:{server.port}"

    async def twilio(self, path: str, params: dict[str, str], **kw: Any) -> tuple[int, str]:
        body, headers = twilio_post(params, path, **kw)
        return await post(self.session, self.base + path, body, headers)


async def _harness(db: Database, settings: Any, **kw: Any) -> tuple[WebhooksServer, EventBus]:
    bus = EventBus()
    server = WebhooksServer(settings, db, bus, **kw)
    await server.start("127.0.0.1", 0)
    return server, bus


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeApi]]:
    apis = {
        "llm": await FakeApi().start(llm_routes),
        "twilio": await FakeApi().start(twilio_rest_routes),
        "sendgrid": await FakeApi().start(sendgrid_routes),
    }
    yield apis
    for api in apis.values():
        await api.stop()


@pytest.fixture
async def make(db: Database, fakes: dict[str, FakeApi]) -> AsyncIterator[Any]:
    """Start a server with settings overrides; everything is stopped at the end."""
    started: list[tuple[WebhooksServer, aiohttp.ClientSession]] = []

    async def start(**sections: Any) -> Harness:
        kw = sections.pop("server_kw", {})
        sections.setdefault("twilio", {})["api_base"] = fakes["twilio"].url
        sections.setdefault("sendgrid", {}).setdefault("api_base", fakes["sendgrid"].url)
        settings = make_settings(**sections)
        server, bus = await _harness(db, settings, **kw)
        session = aiohttp.ClientSession()
        started.append((server, session))
        return Harness(server, session, bus)

    yield start
    for server, session in started:
        await session.close()
        await server.stop()


def sms(body: str, sid: str = "SM0001", sender: str = ALICE) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "SmsSid": sid,
        "AccountSid": "AC0123",
        "From": sender,
        "To": OUR_NUMBER,
        "Body": body,
        "NumMedia": "0",
        "ApiVersion": "2010-04-01",
    }


# ---------------------------------------------------------------------------------- SMS


async def test_sms_status_answers_real_figures_and_stores_everything(db: Database, alice: Any, make: Any) -> None:
    db.write(
        "INSERT INTO usage (user_id, period, voice_seconds, sms_count) VALUES (?, ?, 750, 4)",
        (alice.id, usage.period_of()),
    )
    db.write(
        "INSERT INTO calls (id, user_id, status, started_at) VALUES ('CA1', ?, 'ended', ?)",
        (alice.id, int(time.time() * 1000)),
    )
    h = await make()
    status, text = await h.twilio("/twilio/sms", sms("Status"))
    assert status == 200
    assert "<Message>Plan: personal." in text
    assert "12.5 of 300 voice min" in text and "4 of 500 texts" in text and "Calls today: 1." in text
    await wait_processed(db, 1)
    inbound = messages.get_by_provider_id(db, "SM0001")
    assert inbound is not None and inbound.user_id == alice.id and inbound.body == "Status"
    outbound = messages.get_by_provider_id(db, "reply:SM0001")
    assert outbound is not None and outbound.body.startswith("Plan: personal")
    assert usage.usage_for(db, alice.id).sms_count == 5
    assert h.recorder.of("MessageReceived") and h.recorder.of("WebhookReceived")
    feed = db.query("SELECT type, summary FROM events")
    assert feed and "MessageReceived" in {t for t, _ in feed} and ALICE not in " ".join(s for _, s in feed)


async def test_sms_from_unknown_number_still_gets_twiml(db: Database, make: Any) -> None:
    h = await make()
    status, text = await h.twilio("/twilio/sms", sms("hello", sender="+447700900123"))
    assert status == 200 and replies.UNKNOWN_SENDER in text.replace("&#x27;", "'").replace("&apos;", "'")
    await wait_processed(db, 1)
    assert messages.get_by_provider_id(db, "SM0001").user_id is None  # type: ignore[union-attr]


async def test_sms_delivered_twice_has_one_effect(db: Database, alice: Any, make: Any) -> None:
    h = await make()
    first = await h.twilio("/twilio/sms", sms("help"))
    second = await h.twilio("/twilio/sms", sms("help"))
    assert first[0] == second[0] == 200
    assert "<Message>" in first[1] and "<Message>" not in second[1]
    await wait_processed(db, 1)
    await asyncio.sleep(0.2)
    assert db.query("SELECT COUNT(*) FROM messages WHERE direction = 'in'")[0][0] == 1
    assert usage.usage_for(db, alice.id).sms_count == 1
    assert inbox.replay(db, "twilio-sms:SM0001")  # the processor applying it again counts nothing
    await asyncio.sleep(0.3)
    await wait_processed(db, 1)
    assert usage.usage_for(db, alice.id).sms_count == 1
    assert db.query("SELECT COUNT(*) FROM messages")[0][0] == 2


async def test_sms_without_provider_gets_canned_reply_within_320(db: Database, alice: Any, make: Any) -> None:
    h = await make()
    status, text = await h.twilio("/twilio/sms", sms("Can you move my 3pm?"))
    assert status == 200 and "no AI provider" in text
    assert len(replies.NO_PROVIDER) <= 320


@pytest.mark.parametrize("tamper", ["body", "token", "missing", "url"])
async def test_unsigned_or_tampered_sms_is_403_and_stores_nothing(
    db: Database, alice: Any, make: Any, tamper: str
) -> None:
    h = await make()
    params = sms("status")
    if tamper == "token":
        body, headers = twilio_post(params, "/twilio/sms", token="not-the-token")
    elif tamper == "url":  # signed for the bind address, not the configured public URL
        body, headers = twilio_post(params, "/twilio/sms", base=h.base)
    else:
        body, headers = twilio_post(params, "/twilio/sms")
        if tamper == "body":
            body = body.replace(b"status", b"STATUS")
        else:
            del headers["X-Twilio-Signature"]
    status, _ = await post(h.session, h.base + "/twilio/sms", body, headers)
    assert status == 403
    assert db.query("SELECT COUNT(*) FROM webhook_inbox")[0][0] == 0


async def test_public_url_behind_proxy_with_query_is_what_is_signed(db: Database, alice: Any, make: Any) -> None:
    """Bound on 127.0.0.1:<port>, signed by Twilio for https://hooks.example.com/...?q."""
    h = await make(server={"public_url": PUBLIC_URL + "/"})
    path = "/twilio/sms?tenant=a%20b"
    status, text = await h.twilio(path, sms("help"))
    assert status == 200 and "xswarm commands" in text


async def test_oversized_and_malformed_bodies(db: Database, make: Any) -> None:
    h = await make()
    FORM = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "x"}  # noqa: N806
    big = b"Body=" + b"x" * (1024 * 1024 + 10)
    status, _ = await post(h.session, h.base + "/twilio/sms", big, FORM)
    assert status == 413
    status, _ = await post(h.session, h.base + "/twilio/sms", b"\xff\xfe=\x00", FORM)
    assert status == 400
    status, _ = await post(
        h.session, h.base + "/twilio/sms", b'{"a":1}', {"Content-Type": "application/json", "X-Twilio-Signature": "x"}
    )
    assert status == 415
    assert db.query("SELECT COUNT(*) FROM webhook_inbox")[0][0] == 0


async def test_llm_reply_inline_and_capped(db: Database, alice: Any, make: Any, fakes: dict[str, FakeApi]) -> None:
    fakes["llm"].behaviour["text"] = "word " * 200
    h = await make(
        llm={"provider": "anthropic", "anthropic_api_key": "sk-test", "anthropic_base_url": fakes["llm"].url}
    )
    status, text = await h.twilio("/twilio/sms", sms("Plan my day"))
    assert status == 200
    reply = text.split("<Message>")[1].split("</Message>")[0]
    assert 0 < len(reply) <= 320 and reply.endswith("…")
    sent = fakes["llm"].requests[0]
    assert sent["headers"]["x-api-key"] == "sk-test" and sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "Plan my day" in sent["json"]["messages"][0]["content"]


@pytest.mark.parametrize("behaviour", [{"status": 500}, {"delay": 5.0}])
async def test_llm_failure_or_timeout_gives_canned_reply(
    db: Database, alice: Any, make: Any, fakes: dict[str, FakeApi], behaviour: dict[str, Any]
) -> None:
    fakes["llm"].behaviour.update(behaviour)
    h = await make(
        llm={
            "provider": "openai",
            "openai_api_key": "sk-o",
            "openai_base_url": fakes["llm"].url,
            "timeout_s": 0.3,
            "sms_budget_s": 2.0,
        }
    )
    status, text = await h.twilio("/twilio/sms", sms("anything new?"))
    assert status == 200 and "couldn" in text


async def test_slow_llm_replies_later_through_twilio_rest(
    db: Database, alice: Any, make: Any, fakes: dict[str, FakeApi]
) -> None:
    fakes["llm"].behaviour.update({"delay": 0.6, "text": "Done: moved to 4pm."})
    h = await make(
        llm={
            "provider": "anthropic",
            "anthropic_api_key": "k",
            "anthropic_base_url": fakes["llm"].url,
            "sms_budget_s": 0.2,
            "timeout_s": 5,
        },
    )
    status, text = await h.twilio("/twilio/sms", sms("move my 3pm"))
    assert status == 200 and "<Message>" not in text
    await wait_processed(db, 1)
    rest = fakes["twilio"].requests
    assert len(rest) == 1 and rest[0]["form"] == {"To": ALICE, "From": OUR_NUMBER, "Body": "Done: moved to 4pm."}
    assert rest[0]["path"] == "/2010-04-01/Accounts/AC0123/Messages.json" and rest[0]["auth"].startswith("Basic ")
    reply = messages.get_by_provider_id(db, "reply:SM0001")
    assert reply is not None and reply.meta["via"] == "rest"


async def test_pending_replies_are_bounded_while_the_processor_is_off(
    db: Database, alice: Any, make: Any, fakes: dict[str, FakeApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-memory map is a fast path only: with no processor it stops at the bound, and a
    processor started later still handles every row once, sending no reply twice."""
    monkeypatch.setattr(twilio_sms, "MAX_PENDING", 3)
    ingest_only = await make(server_kw={"process": False})
    for n in range(8):
        status, text = await ingest_only.twilio("/twilio/sms", sms("help", sid=f"SM{n:04d}"))
        assert status == 200 and "<Message>" in text
    pending = ingest_only.server.hub.state["sms-replies"]
    assert list(pending) == ["SM0005", "SM0006", "SM0007"]  # the newest, oldest dropped
    await make()  # a node with a processor (and an empty map) picks the rows up
    await wait_processed(db, 8)
    assert fakes["twilio"].requests == []  # every answer was inline and on record
    for n in range(8):
        assert messages.get_by_provider_id(db, f"SM{n:04d}") is not None
        assert messages.get_by_provider_id(db, f"reply:SM{n:04d}").meta["via"] == "twiml"


async def test_reads_use_the_reader_pool_unless_the_loop_is_the_servers_own(db: Database) -> None:
    """Inside the runtime the loop carries the voice tick: a read must not run on it."""
    loop_thread = threading.get_ident()
    pooled = Hub(make_settings(), db, EventBus())
    inline = Hub(make_settings(), db, EventBus(), inline_reads=True)
    assert await pooled.read(lambda d: threading.get_ident()) != loop_thread
    assert await inline.read(lambda d: threading.get_ident()) == loop_thread
    server = WebhooksServer(make_settings(), db, EventBus(), record_feed=False, inline_reads=True)
    assert server.hub.record_feed is False
    assert await server.hub.read(lambda d: threading.get_ident()) == loop_thread


# -------------------------------------------------------------------------------- voice


def call(sid: str = "CA0001", caller: str = ALICE) -> dict[str, str]:
    return {
        "CallSid": sid,
        "AccountSid": "AC0123",
        "From": caller,
        "To": OUR_NUMBER,
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


async def test_voice_connects_to_a_node_with_a_one_time_token(db: Database, alice: Any, make: Any) -> None:
    nodes.heartbeat(
        db,
        "node-a",
        bridge_url="wss://a.example.com:9998",
        model="echo",
        slots_total=4,
        slots_free=2,
        step_ms_p99=20.0,
        started_at=0,
    ).result()
    h = await make()
    status, text = await h.twilio("/twilio/voice", call())
    assert status == 200
    assert '<Connect action="/twilio/voice/reroute?leg=1"><Stream url="wss://a.example.com:9998/twilio">' in text
    token = text.split('name="token" value="')[1].split('"')[0]
    verify_call_token(CALL_SECRET, token, "CA0001")
    assert int(token.split(".")[1]) <= time.time() + 60
    assert f'name="user_id" value="{alice.id}"' in text and 'name="theme" value="xswarm"' in text


async def test_voice_without_free_slot_takes_voicemail(db: Database, alice: Any, make: Any) -> None:
    nodes.heartbeat(
        db, "full", bridge_url="wss://b:9998", model="echo", slots_total=1, slots_free=0, step_ms_p99=None, started_at=0
    ).result()
    h = await make()
    status, text = await h.twilio("/twilio/voice", call())
    assert status == 200 and "<Say>" in text and '<Record action="/twilio/voice/voicemail"' in text
    assert h.recorder.of("CallRefused")
    recording = {
        **call(),
        "RecordingUrl": "https://api.twilio.com/rec/RE1",
        "RecordingSid": "RE1",
        "RecordingDuration": "14",
    }
    status, text = await h.twilio("/twilio/voice/voicemail", recording)
    assert status == 200 and "<Hangup" in text
    await wait_processed(db, 2)
    vm = messages.get_by_provider_id(db, "RE1")
    assert (
        vm is not None
        and vm.channel == "voicemail"
        and vm.user_id == alice.id
        and vm.meta["recording_url"].endswith("RE1")
    )


async def test_voice_unknown_caller_refused_or_guest(db: Database, make: Any) -> None:
    nodes.heartbeat(
        db, "n", bridge_url="wss://n:9998", model="echo", slots_total=2, slots_free=2, step_ms_p99=None, started_at=0
    ).result()
    refuse = await make()
    _, text = await refuse.twilio("/twilio/voice", call(caller="+15005550006"))
    assert "registered users" in text and "<Hangup" in text and "<Connect" not in text
    guest = await make(telephony={"unknown_callers": "guest"})
    _, text = await guest.twilio("/twilio/voice", call(sid="CA0002", caller="+15005550006"))
    assert "<Connect " in text and 'name="user_id" value="guest"' in text


async def test_voice_quota_used_up_is_refused_politely(db: Database, make: Any) -> None:
    bob = create_user(db, name="Bob", phone="+14155550102", email="bob@example.com", tier="free")
    db.write("INSERT INTO usage (user_id, period, voice_seconds) VALUES (?, ?, 600)", (bob.id, usage.period_of()))
    nodes.heartbeat(
        db, "n", bridge_url="wss://n:9998", model="echo", slots_total=2, slots_free=2, step_ms_p99=None, started_at=0
    ).result()
    h = await make()
    _, text = await h.twilio("/twilio/voice", call(caller=bob.phone))
    assert "used all 10 voice minutes" in text and "<Connect" not in text


def beat(db: Database, node_id: str, free: int, url: str | None = None) -> None:
    nodes.heartbeat(
        db,
        node_id,
        bridge_url=url or f"wss://{node_id}.example.com",
        model="echo",
        slots_total=4,
        slots_free=free,
        step_ms_p99=None,
        started_at=0,
    ).result()


async def test_reroute_moves_a_dropped_call_to_another_node_with_an_apology(
    db: Database, alice: Any, make: Any
) -> None:
    beat(db, "node-a", 4)
    beat(db, "node-b", 1)
    h = await make()
    _, text = await h.twilio("/twilio/voice", call())
    assert 'url="wss://node-a.example.com/twilio"' in text and 'action="/twilio/voice/reroute?leg=1"' in text
    db.write("INSERT INTO calls (id, node_id, status, started_at) VALUES ('CA0001', 'node-a', 'live', 1)")
    status, text = await h.twilio("/twilio/voice/reroute?leg=1", {**call(), "CallStatus": "in-progress"})
    assert status == 200
    assert text.index("<Say>Sorry, we lost the line") < text.index('<Stream url="wss://node-b.example.com/twilio">')
    assert 'action="/twilio/voice/reroute?leg=2"' in text
    verify_call_token(CALL_SECRET, text.split('name="token" value="')[1].split('"')[0], "CA0001")
    # node-a left the call without an end: nothing new goes there until it heartbeats again
    assert [n.suspect for n in nodes.list_nodes(db)] == [True, False]
    beat(db, "node-b", 0)
    _, busy = await h.twilio("/twilio/voice", call(sid="CA0002"))
    assert "<Record" in busy and "<Stream" not in busy
    await asyncio.sleep(0.01)
    beat(db, "node-a", 4)  # alive after all
    _, again = await h.twilio("/twilio/voice", call(sid="CA0003"))
    assert 'url="wss://node-a.example.com/twilio"' in again
    await wait_processed(db, 4)
    row = db.query("SELECT legs, status FROM calls WHERE id = 'CA0001'")[0]
    assert row == (2, "live")
    assert any("re-routed (leg 2) after node node-a" in e.summary for e in h.recorder.of("WebhookReceived"))


async def test_a_call_that_ends_before_it_connects_frees_its_reservation(db: Database, alice: Any, make: Any) -> None:
    beat(db, "node-a", 1)
    h = await make()
    _, first = await h.twilio("/twilio/voice", call())
    assert 'url="wss://node-a.example.com/twilio"' in first
    _, busy = await h.twilio("/twilio/voice", call(sid="CA0002"))
    assert "<Record" in busy  # the one slot is reserved for CA0001
    ended = {**call(), "CallStatus": "canceled", "SequenceNumber": "1"}  # the caller gave up while it rang
    assert (await h.twilio("/twilio/voice/status", ended))[0] == 204
    await wait_processed(db, 3)
    _, third = await h.twilio("/twilio/voice", call(sid="CA0003"))
    assert 'url="wss://node-a.example.com/twilio"' in third


async def test_reroute_leaves_calls_that_ended_normally_alone(db: Database, alice: Any, make: Any) -> None:
    beat(db, "node-a", 4)
    beat(db, "node-b", 4)
    h = await make()
    _, gone = await h.twilio("/twilio/voice/reroute?leg=1", {**call(), "CallStatus": "completed"})
    assert "<Stream" not in gone and "<Say" not in gone  # the caller hung up
    db.write(
        "INSERT INTO calls (id, node_id, status, started_at, end_reason) VALUES (?, 'node-a', 'ended', 1, ?)",
        ("CA0001", "hung up: hung up by op@console"),
    )
    _, hung = await h.twilio("/twilio/voice/reroute?leg=1", {**call(), "CallStatus": "in-progress"})
    assert "<Hangup" in hung and "<Stream" not in hung  # an operator ended it
    db.write("UPDATE calls SET end_reason = 'node shutting down' WHERE id = 'CA0001'")
    _, moved = await h.twilio("/twilio/voice/reroute?leg=1", {**call(), "CallStatus": "in-progress"})
    assert 'url="wss://node-b.example.com/twilio"' in moved  # a node going away is not a normal end
    assert not any(n.suspect for n in nodes.list_nodes(db))  # it said goodbye: not suspect
    _, last = await h.twilio("/twilio/voice/reroute?leg=4", {**call(), "CallStatus": "in-progress"})
    assert "<Record" in last and "<Stream" not in last
    status, _ = await h.twilio("/twilio/voice/reroute?leg=x", {**call(), "CallStatus": "in-progress"})
    assert status == 400


async def test_status_callback_ends_call_and_counts_minutes_once(db: Database, alice: Any, make: Any) -> None:
    h = await make()
    params = {**call(), "CallStatus": "completed", "CallDuration": "95", "SequenceNumber": "3"}
    for _ in range(2):
        status, _ = await h.twilio("/twilio/voice/status", params)
        assert status == 204
    await wait_processed(db, 1)
    row = db.query("SELECT status, duration_s, end_reason, user_id FROM calls WHERE id = 'CA0001'")[0]
    assert row == ("ended", 95.0, "completed", alice.id)
    assert usage.usage_for(db, alice.id).voice_seconds == 95.0
    # the processor retrying the same event (replay) must not count it again
    assert inbox.replay(db, "twilio-voice:CA0001:completed:3")
    await asyncio.sleep(0.3)
    await wait_processed(db, 1)
    assert usage.usage_for(db, alice.id).voice_seconds == 95.0


# ------------------------------------------------------------------------------- Stripe


def subscription(sub_id: str, status: str, price: str, customer: str = "cus_A") -> dict[str, Any]:
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": False,
        "current_period_end": 1_900_000_000,
        "items": {"data": [{"price": {"id": price}}]},
    }


async def _stripe(h: Harness, event: dict[str, Any], **kw: Any) -> int:
    body, headers = stripe_post(event, **kw)
    status, _ = await post(h.session, h.base + "/stripe/webhook", body, headers)
    return status


async def test_stripe_out_of_order_and_duplicates(db: Database, alice: Any, make: Any) -> None:
    set_stripe_customer(db, alice.id, "cus_A")
    h = await make()
    t0 = int(time.time()) - 100
    newer = stripe_event(
        "evt_2", "customer.subscription.updated", subscription("sub_1", "active", "price_pro"), t0 + 50
    )
    older = stripe_event(
        "evt_1", "customer.subscription.created", subscription("sub_1", "incomplete", "price_personal"), t0
    )
    assert await _stripe(h, newer) == 200
    await wait_processed(db, 1)
    assert await _stripe(h, older) == 200
    assert await _stripe(h, older) == 200  # duplicate
    await wait_processed(db, 2)
    sub = billing.get_subscription(db, "sub_1")
    assert sub is not None and sub.status == "active" and sub.tier == "professional"
    assert get_user(db, alice.id).tier == "professional"  # type: ignore[union-attr]
    same_second = stripe_event(
        "evt_3", "customer.subscription.deleted", subscription("sub_1", "canceled", "price_pro"), t0 + 50
    )
    assert await _stripe(h, same_second) == 200
    await wait_processed(db, 3)
    assert get_user(db, alice.id).tier == "free"  # type: ignore[union-attr]
    assert db.query("SELECT COUNT(*) FROM billing_events")[0][0] == 3
    assert [e.status for e in h.recorder.of("PaymentStatusChanged")][-1] == "canceled"


async def test_stripe_checkout_then_invoices(db: Database, alice: Any, make: Any) -> None:
    h = await make()
    now = int(time.time())
    sub_first = stripe_event(
        "evt_s", "customer.subscription.created", subscription("sub_9", "active", "price_personal", "cus_Z"), now - 5
    )
    checkout = stripe_event(
        "evt_c",
        "checkout.session.completed",
        {
            "id": "cs_1",
            "object": "checkout.session",
            "client_reference_id": alice.id,
            "customer": "cus_Z",
            "subscription": "sub_9",
            "payment_status": "paid",
            "amount_total": 2900,
            "currency": "usd",
        },
        now - 4,
    )
    paid = stripe_event(
        "evt_p", "invoice.paid", {"id": "in_1", "customer": "cus_Z", "amount_paid": 2900, "currency": "usd"}, now - 3
    )
    failed = stripe_event(
        "evt_f",
        "invoice.payment_failed",
        {"id": "in_2", "customer": "cus_Z", "amount_due": 2900, "currency": "usd", "attempt_count": 2},
        now - 2,
    )
    unknown = stripe_event("evt_u", "customer.created", {"id": "cus_Z"}, now)
    for event in (sub_first, checkout, paid, failed, unknown):
        assert await _stripe(h, event) == 200
        await asyncio.sleep(0.05)
    await wait_processed(db, 5)
    user = get_user(db, alice.id)
    assert user is not None and user.stripe_customer_id == "cus_Z" and user.tier == "personal"
    rows = db.query("SELECT type, amount, summary FROM billing_events WHERE user_id = ?", (alice.id,))
    kinds = {row[0]: row for row in rows}
    assert kinds["invoice.paid"][1] == 2900 and "attempt 2" in kinds["invoice.payment_failed"][2]


@pytest.mark.parametrize("case", ["wrong-secret", "old-timestamp", "missing", "tampered"])
async def test_stripe_rejects_bad_signatures(db: Database, make: Any, case: str) -> None:
    h = await make()
    event = stripe_event("evt_x", "invoice.paid", {"id": "in_1"}, int(time.time()))
    if case == "wrong-secret":
        body, headers = stripe_post(event, secret="whsec_other")
    elif case == "old-timestamp":
        body, headers = stripe_post(event, timestamp=int(time.time()) - 301)
    else:
        body, headers = stripe_post(event)
        if case == "missing":
            del headers["Stripe-Signature"]
        else:
            body = body.replace(b"in_1", b"in_2")
    status, _ = await post(h.session, h.base + "/stripe/webhook", body, headers)
    assert status == 403
    assert db.query("SELECT COUNT(*) FROM webhook_inbox")[0][0] == 0


# ----------------------------------------------------------------------------- SendGrid


async def test_sendgrid_events_signed_deduped_and_forward_only(db: Database, alice: Any, make: Any) -> None:
    key = SendGridKey()
    h = await make(sendgrid={"webhook_public_key": key.public_b64})
    db.write(
        *messages.insert_statement(
            channel="email",
            direction="out",
            provider_id="sgabc",
            user_id=alice.id,
            from_addr="x@y",
            to_addr=alice.email,
            body="hi",
            status="sent",
        )
    )
    items = [
        {
            "email": alice.email,
            "timestamp": 1,
            "event": "delivered",
            "sg_event_id": "ev1",
            "sg_message_id": "sgabc.filter1.1",
        },
        {
            "email": alice.email,
            "timestamp": 2,
            "event": "processed",
            "sg_event_id": "ev2",
            "sg_message_id": "sgabc.filter1.1",
        },
    ]
    body = (json.dumps(items) + "\n").encode()
    for _ in range(2):
        status, _ = await post(
            h.session, h.base + "/sendgrid/events", body, {**key.headers(body), "Content-Type": "application/json"}
        )
        assert status == 200
    await wait_processed(db, 2)
    assert db.query("SELECT COUNT(*) FROM webhook_inbox WHERE provider = 'sendgrid-events'")[0][0] == 2
    assert messages.get_by_provider_id(db, "sgabc").status == "delivered"  # type: ignore[union-attr]
    old = key.headers(body, timestamp=int(time.time()) - 301)
    assert (await post(h.session, h.base + "/sendgrid/events", body, old))[0] == 403
    tampered = body.replace(b"delivered", b"bounce")
    assert (await post(h.session, h.base + "/sendgrid/events", tampered, key.headers(body)))[0] == 403
    other = SendGridKey()
    assert (await post(h.session, h.base + "/sendgrid/events", body, other.headers(body)))[0] == 403


def _multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = "xYzZY-boundary"
    out = b""
    for name, value in fields.items():
        out += (
            (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n').encode()
            + value.encode()
            + b"\r\n"
        )
    for index, (filename, ctype, data) in enumerate(files, start=1):
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="attachment{index}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


async def test_sendgrid_inbound_mail_stored_attachment_kept_reply_threaded(
    db: Database, alice: Any, make: Any, fakes: dict[str, FakeApi], xswarm_home: Path
) -> None:
    key = SendGridKey()
    h = await make(
        sendgrid={"webhook_public_key": key.public_b64, "api_key": "SG.k", "from_email": "assistant@xswarm.example"}
    )
    attachment = bytes(range(256)) * 8000  # 2 MB of binary: over the 1 MiB limit of other routes
    body, ctype = _multipart(
        {
            "from": "Alice <alice@example.com>",
            "to": "assistant@xswarm.example",
            "subject": "Lunch",
            "text": "Are we on for lunch?",
            "headers": "Message-ID: <m1@example.com>\nSubject: Lunch\n",
            "envelope": json.dumps({"to": ["assistant@xswarm.example"], "from": "alice@example.com"}),
            "attachments": "1",
        },
        [("menu.bin", "application/octet-stream", attachment)],
    )
    status, text = await post(
        h.session, h.base + "/sendgrid/inbound", body, {**key.headers(body), "Content-Type": ctype}
    )
    assert status == 200, text
    await wait_processed(db, 1)
    mail = messages.get_by_provider_id(db, "<m1@example.com>")
    assert (
        mail is not None
        and mail.user_id == alice.id
        and mail.subject == "Lunch"
        and mail.body == "Are we on for lunch?"
    )
    (meta,) = mail.meta["attachments"]
    assert meta["size"] == len(attachment) and meta["filename"] == "menu.bin"
    assert (xswarm_home / "data" / "storage" / meta["key"]).read_bytes() == attachment
    (sent,) = fakes["sendgrid"].requests
    assert sent["json"]["subject"] == "Re: Lunch" and sent["json"]["headers"]["In-Reply-To"] == "<m1@example.com>"
    assert sent["json"]["personalizations"][0]["to"][0]["email"] == "alice@example.com"
    assert usage.usage_for(db, alice.id).email_count == 1
    unsigned = await post(h.session, h.base + "/sendgrid/inbound", body, {"Content-Type": ctype})
    assert unsigned[0] == 403


# ------------------------------------------------------------------------ identity, health


async def test_identity_api_and_identical_401s(db: Database, alice: Any, make: Any) -> None:
    _, key = create_api_key(db, alice.id)
    revoked_id, revoked = create_api_key(db, alice.id)
    assert revoke_api_key(db, revoked_id)
    h = await make()
    async with h.session.get(h.base + "/api/identity", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["id"] == alice.id and data["tier"] == "personal" and data["quotas"]["sms"] == 500
    assert data["remaining"]["voice_minutes"] == 300 and "hash" not in json.dumps(data)
    answers = set()
    for header in (
        {},
        {"Authorization": "Bearer xsk_nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": f"Bearer {revoked}"},
    ):
        async with h.session.get(h.base + "/api/identity", headers=header) as resp:
            answers.add((resp.status, await resp.text(), resp.headers.get("WWW-Authenticate")))
    assert answers == {(401, '{"error":"unauthorized"}', "Bearer")}


async def test_health_reports_database(db: Database, make: Any) -> None:
    h = await make()
    async with h.session.get(h.base + "/health") as resp:
        assert resp.status == 200 and (await resp.json())["database"] == "ok"


async def test_refusals_are_rate_limited_signed_deliveries_never(db: Database, alice: Any, make: Any) -> None:
    """Issue 13, item 4: the limit counted every request before the signature check, so an
    unsigned flood from a shared address got real signed SMS answered 429."""
    h = await make(server_kw={"rate_limit": RateLimit(rate=1.0, burst=3.0)})
    forged = {"X-Twilio-Signature": "forged", "Content-Type": "application/x-www-form-urlencoded"}
    codes = [(await post(h.session, h.base + "/twilio/sms", b"Body=x", forged))[0] for _ in range(5)]
    assert codes == [403, 403, 403, 429, 429]
    async with h.session.get(h.base + "/health") as resp:
        assert resp.status == 200  # health is never limited
    quiet = await make(server_kw={"rate_limit": RateLimit(rate=1.0, burst=3.0)})
    assert [(await quiet.twilio("/twilio/sms", sms("help", sid=f"SM{i}")))[0] for i in range(6)] == [200] * 6


async def test_sendgrid_inbound_raw_mode_twice_is_one_mail_and_one_reply(
    db: Database, alice: Any, make: Any, fakes: dict[str, FakeApi]
) -> None:
    key = SendGridKey()
    h = await make(
        sendgrid={"webhook_public_key": key.public_b64, "api_key": "SG.k", "from_email": "assistant@xswarm.example"}
    )
    mime = (
        "From: Alice <alice@example.com>\r\nTo: assistant@xswarm.example\r\nSubject: Re: Plans\r\n"
        "Message-ID: <raw1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "See you at noon.\r\n"
    )
    body, ctype = _multipart(
        {"email": mime, "to": "assistant@xswarm.example", "envelope": json.dumps({"from": "alice@example.com"})}, []
    )
    for _ in range(2):
        status, _ = await post(
            h.session, h.base + "/sendgrid/inbound", body, {**key.headers(body), "Content-Type": ctype}
        )
        assert status == 200
    await wait_processed(db, 1)
    await asyncio.sleep(0.2)
    mail = messages.get_by_provider_id(db, "<raw1@example.com>")
    assert mail is not None and mail.subject == "Re: Plans" and mail.body.strip() == "See you at noon."  # type: ignore[union-attr]
    assert len(fakes["sendgrid"].requests) == 1 and fakes["sendgrid"].requests[0]["json"]["subject"] == "Re: Plans"
    assert usage.usage_for(db, alice.id).email_count == 1


async def test_inbound_mail_limit_is_30_mb(db: Database, make: Any) -> None:
    key = SendGridKey()
    h = await make(sendgrid={"webhook_public_key": key.public_b64})
    body, ctype = _multipart({"text": "x"}, [("big.bin", "application/octet-stream", b"\0" * (30 * 1024 * 1024 + 1))])
    status, _ = await post(h.session, h.base + "/sendgrid/inbound", body, {**key.headers(b""), "Content-Type": ctype})
    assert status == 413
    assert db.query("SELECT COUNT(*) FROM webhook_inbox")[0][0] == 0
