"""Notifications end to end: the real webhooks server and outbox sender on 127.0.0.1, requests
signed with the providers' SDK helpers, Twilio, SendGrid and Stripe faked at their HTTP APIs.
Covers every kind (welcome, voicemail, quota 80 %/100 %, payment failed, billing links), the
SMS keywords, opt-outs by kind and by STOP, and retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from typer.testing import CliRunner

from engine.config import Settings
from engine.events import EventBus
from engine.notify import compose
from engine.notify.sender import OUTBOX_ARG, OutboxSender, send_now
from engine.notify.sendgrid_client import SendGridClient
from engine.store import optouts, outbox, usage
from engine.store.db import Database, Target
from engine.store.migrations import migrate
from engine.store.users import User, create_user, set_stripe_customer
from engine.telephony.twilio_rest import TwilioClient
from tests.provider_fakes import FakeSendGrid, FakeStripe, FakeTwilio, wait_until
from tests.webhooks_support import (
    PUBLIC_URL,
    FakeApi,
    SendGridKey,
    llm_routes,
    make_settings,
    post,
    stripe_event,
    stripe_post,
    twilio_post,
    wait_processed,
)
from webhooks import replies
from webhooks.server import WebhooksServer
from xswarm_tui.cli import app

ALICE = "+14155550101"
OUR_NUMBER = "+14155550199"
OPERATOR = "ops@example.com"


@pytest.fixture
def db(tmp_path: Path) -> Any:
    database = Database(Target(str(tmp_path / "notify.db"))).start()
    migrate(database)
    yield database
    database.close()


@dataclass
class World:
    db: Database
    settings: Settings
    server: WebhooksServer
    twilio: FakeTwilio
    sendgrid: FakeSendGrid
    stripe: FakeStripe
    key: SendGridKey
    session: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def sms(self, body: str, sid: str, sender: str = ALICE) -> str:
        params = {"MessageSid": sid, "AccountSid": "AC0123", "From": sender, "To": OUR_NUMBER, "Body": body}
        data, headers = twilio_post(params, "/twilio/sms")
        status, text = await post(self.session, self.base + "/twilio/sms", data, headers)
        assert status == 200
        return text.replace("&apos;", "'").replace("&#x27;", "'")

    async def quiet(self) -> None:
        """Stop the server's own sender, for a test that drives sends itself."""
        assert self.server.hub.outbox is not None
        await self.server.hub.outbox.stop()

    def rows(self, **kw: Any) -> list[outbox.OutboxRow]:
        return outbox.list_rows(self.db, limit=1000, **kw)

    async def settled(self, count: int) -> list[outbox.OutboxRow]:
        """Wait until ``count`` rows exist and none is still queued or being sent."""
        await wait_until(
            lambda: len(self.rows()) >= count and all(r.status not in ("pending", "sending") for r in self.rows())
        )
        return self.rows()


@pytest.fixture
async def world(db: Database) -> AsyncIterator[World]:
    twilio, sendgrid, stripe = await FakeTwilio().start(), await FakeSendGrid().start(), await FakeStripe().start()
    key = SendGridKey()
    settings = make_settings(
        twilio={"api_base": twilio.url, "from_number": OUR_NUMBER},
        sendgrid={
            "api_base": sendgrid.url,
            "api_key": "SG.test",
            "from_email": "assistant@xswarm.example",
            "webhook_public_key": key.public_b64,
        },
        stripe={"api_base": stripe.url, "api_key": "sk_test_fake"},
        notify={"operator_email": OPERATOR, "link_secret": "link-secret-for-tests"},
    )
    server = WebhooksServer(settings, db, EventBus())
    await server.start("127.0.0.1", 0)
    session = aiohttp.ClientSession()
    yield World(db, settings, server, twilio, sendgrid, stripe, key, session)
    await session.close()
    await server.stop()
    for fake in (twilio, sendgrid, stripe):
        await fake.stop()


def alice(db: Database, tier: str = "personal") -> User:
    return create_user(db, name="Alice", phone=ALICE, email="alice@example.com", tier=tier)


def content(mail: dict[str, Any]) -> dict[str, str]:
    return {part["type"]: part["value"] for part in mail["content"]}


# ------------------------------------------------------------------------------ welcome


async def test_welcome_by_sms_and_email_with_plain_text_and_one_click_unsubscribe(world: World) -> None:
    user = alice(world.db)
    await world.quiet()
    rows = await send_now(world.settings, world.db, compose.welcome(world.settings, user))
    assert sorted((r.channel, r.status) for r in rows) == [("email", "sent"), ("sms", "sent")]
    (sms,) = world.twilio.to(ALICE)
    assert sms["from"] == OUR_NUMBER and "Welcome to xswarm, Alice" in sms["body"] and "STOP" in sms["body"]
    (mail,) = world.sendgrid.to("alice@example.com")
    parts = content(mail)
    assert list(parts) == ["text/plain", "text/html"] and "welcome to xswarm" in parts["text/plain"]
    assert mail["custom_args"] == {OUTBOX_ARG: f"welcome:{user.id}:email"}
    assert mail["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = mail["headers"]["List-Unsubscribe"].strip("<>")
    assert link.startswith(PUBLIC_URL + "/notify/unsubscribe?")
    # Sent once: asking again (same id) sends nothing more.
    await send_now(world.settings, world.db, compose.welcome(world.settings, user))
    assert len(world.twilio.messages) == 1 and len(world.sendgrid.mails) == 1
    sent = world.db.query("SELECT channel, provider_id FROM messages WHERE direction = 'out' ORDER BY channel")
    assert sent == [("email", "sgmsg1"), ("sms", world.twilio.messages[0]["sid"])]

    # The one-click link, as a mail client posts it; a GET only shows a button; a forged one is refused.
    local = world.base + urlsplit(link).path + "?" + urlsplit(link).query
    async with world.session.get(local) as resp:
        assert resp.status == 200 and "<form method=post>" in await resp.text()
    assert not optouts.kind_off(world.db, user.id, "welcome")
    async with world.session.post(local, data="List-Unsubscribe=One-Click") as resp:
        assert resp.status == 200
    assert optouts.kind_off(world.db, user.id, "welcome")
    async with world.session.post(local.replace("k=welcome", "k=quota")) as resp:
        assert resp.status == 403


# ---------------------------------------------------------------------------- voicemail


def _voicemail(call: str, recording: str, sender: str, **extra: str) -> dict[str, str]:
    return {
        "CallSid": call,
        "AccountSid": "AC0123",
        "From": sender,
        "To": OUR_NUMBER,
        "RecordingSid": recording,
        "RecordingUrl": f"https://api.twilio.com/2010-04-01/Accounts/AC0123/Recordings/{recording}",
        "RecordingDuration": "14",
        **extra,
    }


async def _post_voicemail(world: World, params: dict[str, str], path: str = "/twilio/voice/voicemail") -> None:
    data, headers = twilio_post(params, path)
    status, _ = await post(world.session, world.base + path, data, headers)
    assert status in (200, 204)


async def _post_transcript(world: World, call: str, recording: str, sender: str, text: str | None) -> None:
    """Twilio's transcribeCallback: ``text`` None is a failed transcription."""
    state = (
        {"TranscriptionStatus": "completed", "TranscriptionText": text} if text else {"TranscriptionStatus": "failed"}
    )
    params = {
        "CallSid": call,
        "AccountSid": "AC0123",
        "From": sender,
        "To": OUR_NUMBER,
        "RecordingSid": recording,
        "RecordingUrl": f"https://api.twilio.com/2010-04-01/Accounts/AC0123/Recordings/{recording}",
        "TranscriptionSid": f"TR{recording}",
        **state,
    }
    await _post_voicemail(world, params, "/twilio/voice/transcription")


async def test_voicemail_notice_waits_for_twilios_transcript(world: World) -> None:
    alice(world.db)
    data, headers = twilio_post(
        {"CallSid": "CA5", "AccountSid": "AC0123", "From": ALICE, "To": OUR_NUMBER}, "/twilio/voice"
    )
    status, answer = await post(world.session, world.base + "/twilio/voice", data, headers)
    assert status == 200  # no node has a free slot: voicemail, transcribed
    assert 'transcribe="true"' in answer and 'transcribeCallback="/twilio/voice/transcription"' in answer
    await _post_voicemail(world, _voicemail("CA5", "RE5", ALICE))
    await wait_until(lambda: len(world.rows()) == 2)
    assert {r.status for r in world.rows()} == {"pending"} and world.twilio.messages == []  # held for the transcript
    await _post_transcript(world, "CA5", "RE5", ALICE, "Running late, start without me.")
    await world.settled(2)
    (sms,) = world.twilio.to(ALICE)
    assert '"Running late, start without me."' in sms["body"] and "(14 s)" in sms["body"]
    assert "Transcript:\nRunning late" in content(world.sendgrid.to("alice@example.com")[0])["text/plain"]
    assert world.db.query("SELECT body FROM messages WHERE provider_id = 'RE5'") == [
        ("Running late, start without me.",)
    ]
    await _post_transcript(world, "CA5", "RE5", ALICE, "A second, different transcript.")  # already sent: unchanged
    await asyncio.sleep(0.3)
    assert len(world.twilio.messages) == 1 and "Running late" in world.rows(status="sent")[0].body


async def test_voicemail_reaches_the_user_with_transcript_and_a_listen_link(world: World) -> None:
    alice(world.db)
    await _post_voicemail(world, _voicemail("CA1", "RE1", ALICE, TranscriptionText="Call me back about Friday."))
    await world.settled(2)
    (sms,) = world.twilio.to(ALICE)
    assert "Call me back about Friday" in sms["body"] and "(14 s)" in sms["body"]
    (mail,) = world.sendgrid.to("alice@example.com")
    text = content(mail)["text/plain"]
    assert "Transcript:\nCall me back about Friday." in text
    link = text.split("Listen: ")[1].split()[0]
    assert link.startswith(PUBLIC_URL + "/notify/voicemail/RE1?")
    assert f'<a href="{link.replace("&", "&amp;")}">' in content(mail)["text/html"]
    local = world.base + urlsplit(link).path + "?" + urlsplit(link).query
    async with world.session.get(local) as resp:
        assert resp.status == 200 and resp.content_type == "audio/mpeg"
        assert await resp.read() == b"ID3 fake mp3 of RE1"
    async with world.session.get(local.replace("/RE1?", "/RE2?")) as resp:
        assert resp.status == 403  # the signature names one recording
    # Non-ASCII in a signature or an expiry is a forged link (403), not a server error.
    for query in ("e=9999999999&s=%C3%A9", "e=%C2%B2&s=x"):
        async with world.session.get(f"{world.base}/notify/voicemail/RE1?{query}") as resp:
            assert resp.status == 403, query
    async with world.session.get(f"{world.base}/notify/unsubscribe?u=u-nobody&k=welcome&s=%C3%A9") as resp:
        assert resp.status == 403


async def test_voicemail_from_a_stranger_goes_to_the_operator_with_a_notice(world: World) -> None:
    await _post_voicemail(world, _voicemail("CA2", "RE2", "+14155550777"))
    await _post_transcript(world, "CA2", "RE2", "+14155550777", None)  # Twilio could not transcribe it
    (row,) = await world.settled(1)
    assert row.status == "sent" and row.to_addr == OPERATOR and row.channel == "email"
    (mail,) = world.sendgrid.to(OPERATOR)
    assert mail["subject"] == "Voicemail from +14155550777"
    assert "There is no transcript of this message." in content(mail)["text/plain"]
    assert world.twilio.messages == []


async def test_a_kind_turned_off_is_not_sent(world: World) -> None:
    user = alice(world.db)
    optouts.set_kind(world.db, user.id, "voicemail", False)
    await _post_voicemail(world, _voicemail("CA3", "RE3", ALICE))
    await _post_transcript(world, "CA3", "RE3", ALICE, "Hello?")
    rows = await world.settled(2)
    assert {r.status for r in rows} == {"suppressed"} and world.twilio.messages == world.sendgrid.mails == []


# -------------------------------------------------------------------------------- quota


async def test_quota_notices_at_80_and_100_percent_once_each(world: World) -> None:
    user = alice(world.db, tier="free")  # 20 texts a month
    world.db.write("INSERT INTO usage (user_id, period, sms_count) VALUES (?, ?, 15)", (user.id, usage.period_of()))
    await world.sms("status", "SM001")  # 16 of 20 = 80 %
    await world.sms("status", "SM002")  # 17: no second 80 % notice
    rows = await world.settled(2)
    assert sorted(r.id for r in rows) == [f"quota_80:sms:{user.id}:{usage.period_of()}:{c}" for c in ("email", "sms")]
    world.db.write("UPDATE usage SET sms_count = 19 WHERE user_id = ?", (user.id,))
    await world.sms("status", "SM003")  # 20 of 20
    rows = await world.settled(4)
    assert sorted(r.id.split(":")[0] for r in rows) == ["quota_100"] * 2 + ["quota_80"] * 2
    notices = [m["body"] for m in world.twilio.to(ALICE) if "plan" in m["body"] and "used" in m["body"]]
    assert len(notices) == 2 and "80%" in notices[0] and "used all 20 texts" in notices[1]


async def test_voice_minutes_quota_counts_from_the_call_status_callback(world: World) -> None:
    user = alice(world.db, tier="free")  # 10 voice minutes
    params = {
        "CallSid": "CA9",
        "AccountSid": "AC0123",
        "From": ALICE,
        "To": OUR_NUMBER,
        "CallStatus": "completed",
        "CallDuration": "540",
        "SequenceNumber": "3",
    }
    data, headers = twilio_post(params, "/twilio/voice/status")
    status, _ = await post(world.session, world.base + "/twilio/voice/status", data, headers)
    assert status == 204
    rows = await world.settled(2)
    assert {r.id for r in rows} == {f"quota_80:voice:{user.id}:{usage.period_of()}:{c}" for c in ("sms", "email")}


# ------------------------------------------------------------------------ payment failed


async def test_payment_failed_is_told_once_per_invoice_attempt(world: World) -> None:
    user = alice(world.db)
    set_stripe_customer(world.db, user.id, "cus_A")
    invoice = {"id": "in_1", "customer": "cus_A", "amount_due": 999, "currency": "usd", "attempt_count": 1}
    for event_id in ("evt_f1", "evt_f1", "evt_f2"):  # a duplicate delivery, then Stripe's same attempt re-sent
        body, headers = stripe_post(stripe_event(event_id, "invoice.payment_failed", invoice, 1_700_000_000))
        status, _ = await post(world.session, world.base + "/stripe/webhook", body, headers)
        assert status == 200
    rows = await world.settled(2)
    assert sorted(r.id for r in rows) == ["payment_failed:in_1:1:email", "payment_failed:in_1:1:sms"]
    (sms,) = world.twilio.to(ALICE)
    assert "9.99 USD" in sms["body"] and "BILLING" in sms["body"]


# --------------------------------------------------------------------------- SMS keywords


async def test_stop_is_honoured_for_every_later_message_until_start(world: World) -> None:
    user = alice(world.db)
    await world.quiet()
    assert (await world.sms("STOP", "SM010")).count(replies.STOP_REPLY) == 1
    assert optouts.sms_opted_out(world.db, ALICE)
    assert replies.HELP_TEXT in await world.sms("help", "SM011")  # HELP is always answered
    assert "<Message>" not in await world.sms("what's up?", "SM012")  # nothing else is
    rows = await send_now(world.settings, world.db, compose.welcome(world.settings, user))
    assert {r.channel: r.status for r in rows} == {"sms": "suppressed", "email": "sent"}
    assert world.twilio.messages == []  # TwiML answers are not REST sends; nothing went out by REST
    assert replies.START_REPLY in await world.sms("yes", "SM013")  # YES opts back in only after a STOP
    assert not optouts.sms_opted_out(world.db, ALICE)
    assert replies.START_REPLY not in await world.sms("Yes!", "SM014")  # now it is just an answer
    assert replies.STOP_REPLY in await world.sms("cancel", "SM015")
    assert replies.START_REPLY in await world.sms("Start", "SM016")
    assert not optouts.sms_opted_out(world.db, ALICE)
    world.db.write("DELETE FROM outbox")
    rows = await send_now(world.settings, world.db, compose.welcome(world.settings, user))
    assert {r.channel: r.status for r in rows} == {"sms": "sent", "email": "sent"}


async def test_a_number_twilio_reports_unsubscribed_is_recorded_as_stop(world: World) -> None:
    user = alice(world.db)
    await world.quiet()
    world.twilio.refuse[ALICE] = (400, 21610)
    rows = await send_now(world.settings, world.db, compose.welcome(world.settings, user))
    assert {r.channel: r.status for r in rows}["sms"] == "suppressed"
    assert optouts.sms_opted_out(world.db, ALICE)


async def test_twilio_advanced_opt_out_answers_for_itself(world: World) -> None:
    alice(world.db)
    params = {"MessageSid": "SM020", "From": ALICE, "To": OUR_NUMBER, "Body": "stop", "OptOutType": "STOP"}
    data, headers = twilio_post(params, "/twilio/sms")
    status, text = await post(world.session, world.base + "/twilio/sms", data, headers)
    assert status == 200 and "<Message>" not in text and optouts.sms_opted_out(world.db, ALICE)


async def test_upgrade_texts_a_checkout_link_and_billing_a_portal_link(world: World) -> None:
    user = alice(world.db, tier="free")
    assert replies.NO_CUSTOMER in await world.sms("BILLING", "SM030")
    answer = await world.sms("upgrade", "SM031")
    session = next(iter(world.stripe.sessions.values()))
    assert f"Subscribe to xswarm personal: {session['url']}" in answer.replace("&amp;", "&")
    assert session["client_reference_id"] == user.id and session["price"] == "price_personal"
    checkout = [r for r in world.stripe.requests if r["path"] == "/v1/checkout/sessions"]
    assert checkout[0]["key"] == "xswarm-upgrade-SM031"
    answer = await world.sms("UPGRADE pro", "SM032")
    assert "Subscribe to xswarm professional" in answer
    assert len([r for r in world.stripe.requests if r["path"] == "/v1/customers"]) == 1  # the customer is reused
    answer = await world.sms("billing", "SM033")
    assert "Manage your xswarm subscription: https://billing.stripe.test/p/session/" in answer


# ------------------------------------------------------------------------------ retries


async def test_a_failed_send_is_retried_and_dead_after_max_attempts(world: World, db: Database) -> None:
    user = alice(db)
    await world.quiet()
    settings = world.settings.model_copy(
        update={"notify": world.settings.notify.model_copy(update={"max_attempts": 2})}
    )
    world.twilio.refuse[ALICE] = (500, 20500)
    drafts = compose.welcome(settings, user, channels=("sms",))
    (row,) = await send_now(settings, db, drafts)
    assert row.status == "failed" and row.attempts == 1 and "500" in (row.last_error or "")
    del world.twilio.refuse[ALICE]
    db.write("UPDATE outbox SET next_attempt_at = 0")
    async with aiohttp.ClientSession() as session:
        sender = OutboxSender(
            settings, db, TwilioClient(settings.twilio, session), SendGridClient(settings.sendgrid, session)
        )
        await sender.drain()
    (row,) = outbox.list_rows(db)
    assert row.status == "sent" and row.attempts == 2 and len(world.twilio.messages) == 1

    world.twilio.refuse[ALICE] = (500, 20500)
    db.write("DELETE FROM outbox")
    await send_now(settings, db, drafts)
    db.write("UPDATE outbox SET next_attempt_at = 0")
    await send_now(settings, db, drafts)
    (row,) = outbox.list_rows(db)
    assert row.status == "dead" and row.attempts == 2
    # The operator fixes the cause and queues it again.
    del world.twilio.refuse[ALICE]
    assert outbox.retry(db, row.id) == 1 and outbox.retry(db, row.id) == 0
    await send_now(settings, db, drafts)
    (row,) = outbox.list_rows(db)
    assert row.status == "sent" and row.attempts == 1 and len(world.twilio.messages) == 2


async def test_the_server_sends_what_the_cli_left_queued(world: World) -> None:
    """A row queued while a provider was down goes out from the running server's sender."""
    user = alice(world.db)
    world.db.write(*outbox.enqueue_statement(compose.welcome(world.settings, user, channels=("email",))[0]))
    world.server.hub.wake_outbox()
    (row,) = await world.settled(1)
    assert row.status == "sent" and len(world.sendgrid.mails) == 1


async def test_users_add_welcome_sends_through_the_outbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI path: ``users add --welcome`` queues the welcome and sends it at once."""
    twilio, sendgrid = await FakeTwilio().start(), await FakeSendGrid().start()
    try:
        for name, value in {
            "TWILIO_ACCOUNT_SID": "AC0123",
            "TWILIO_AUTH_TOKEN": "token",
            "TWILIO_FROM_NUMBER": OUR_NUMBER,
            "XSWARM_TWILIO__API_BASE": twilio.url,
            "SENDGRID_API_KEY": "SG.test",
            "SENDGRID_FROM_EMAIL": "assistant@xswarm.example",
            "XSWARM_SENDGRID__API_BASE": sendgrid.url,
        }.items():
            monkeypatch.setenv(name, value)
        args = ["users", "add", "--name", "Ada", "--phone", ALICE, "--email", "ada@example.com", "--welcome"]
        result = await asyncio.to_thread(CliRunner().invoke, app, args, catch_exceptions=False)
        assert result.exit_code == 0 and result.stdout.startswith("created user ")
        assert "welcome sms: sent" in result.stderr and "welcome email: sent" in result.stderr
        assert len(twilio.to(ALICE)) == 1 and len(sendgrid.to("ada@example.com")) == 1
        # No provider configured: the user is still created, and the operator is told.
        monkeypatch.delenv("SENDGRID_API_KEY")
        monkeypatch.delenv("TWILIO_AUTH_TOKEN")
        args = ["users", "add", "--name", "Bo", "--phone", "+14155550102", "--email", "bo@example.com", "--welcome"]
        result = await asyncio.to_thread(CliRunner().invoke, app, args, catch_exceptions=False)
        assert result.exit_code == 0 and "welcome: not sent (neither Twilio nor SendGrid" in result.stderr
    finally:
        await twilio.stop()
        await sendgrid.stop()


async def test_a_late_reply_is_not_sent_after_the_number_texted_stop(db: Database) -> None:
    """STOP arrives while the LLM is still composing the reply to an earlier text."""
    llm = await FakeApi(behaviour={"delay": 1.0, "text": "Here is your plan."}).start(llm_routes)
    twilio = await FakeTwilio().start()
    settings = make_settings(
        twilio={"api_base": twilio.url, "from_number": OUR_NUMBER},
        llm={"provider": "anthropic", "anthropic_api_key": "k", "anthropic_base_url": llm.url, "sms_budget_s": 0.2},
    )
    alice(db)
    server = WebhooksServer(settings, db, EventBus())
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            for sid, body in (("SM100", "plan my day"), ("SM101", "STOP")):
                params = {"MessageSid": sid, "From": ALICE, "To": OUR_NUMBER, "Body": body}
                data, headers = twilio_post(params, "/twilio/sms")
                status, _ = await post(session, f"http://127.0.0.1:{server.port}/twilio/sms", data, headers)
                assert status == 200
        await wait_processed(db, 2)
        assert len(llm.requests) == 1 and twilio.messages == []
    finally:
        await server.stop()
        await llm.stop()
        await twilio.stop()


def test_the_newest_keyword_wins_so_a_replayed_stop_does_not_undo_a_start(db: Database) -> None:
    stop, start = optouts.sms_statement(ALICE, "STOP", 1_000), optouts.sms_statement(ALICE, "START", 2_000)
    assert stop is not None and start is not None
    db.write(*stop)
    db.write(*start)
    db.write(*stop)  # replayed late
    assert not optouts.sms_opted_out(db, ALICE)
    assert optouts.sms_statement(ALICE, "hello there", 3_000) is None
    yes = optouts.sms_statement("+14155550102", "YES", 3_000)
    assert yes is not None
    db.write(*yes)  # YES from a number that never opted out changes nothing
    assert db.query("SELECT COUNT(*) FROM sms_optout WHERE phone = '+14155550102'") == [(0,)]
