"""Exactly-once across a crash: a real ``xswarm notify drain`` process is SIGKILLed after the
provider accepted its message (before or right after the provider's 2xx) and before it could
commit; the next run must not send the message again, and must record the provider's id.

SMS: Twilio has no idempotency key, so the next run lists the recent messages to that number
and finds ours. Email: SendGrid has none either; the mail carries its outbox id, SendGrid's
signed ``processed`` event (delivered by the fake, as SendGrid would) settles it, and until
then the row waits instead of being sent again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_settings
from engine.events import EventBus
from engine.notify import compose
from engine.store import outbox
from engine.store.db import Database
from engine.store.migrations import open_database
from engine.store.users import User, create_user
from tests.provider_fakes import FakeSendGrid, FakeTwilio, wait_until
from tests.webhooks_support import PUBLIC_URL, SendGridKey
from webhooks.server import WebhooksServer

ALICE = "+14155550101"
OUR_NUMBER = "+14155550199"
pytestmark = pytest.mark.slow


@pytest.fixture
async def fakes(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[FakeTwilio, FakeSendGrid, SendGridKey]]:
    twilio, sendgrid, key = await FakeTwilio().start(), await FakeSendGrid().start(), SendGridKey()
    env = {
        "TWILIO_ACCOUNT_SID": "AC0123",
        "TWILIO_AUTH_TOKEN": "twilio-test-auth-token-0123456789",
        "TWILIO_FROM_NUMBER": OUR_NUMBER,
        "XSWARM_TWILIO__API_BASE": twilio.url,
        "SENDGRID_API_KEY": "SG.test",
        "SENDGRID_FROM_EMAIL": "assistant@xswarm.example",
        "SENDGRID_WEBHOOK_PUBLIC_KEY": key.public_b64,
        "XSWARM_SENDGRID__API_BASE": sendgrid.url,
        "XSWARM_PUBLIC_URL": PUBLIC_URL,
        "XSWARM_NOTIFY__LEASE_S": "3",
        "XSWARM_NOTIFY__EMAIL_CONFIRM_WAIT_S": "3600",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield twilio, sendgrid, key
    await twilio.stop()
    await sendgrid.stop()


def _queue(db: Database, user: User, channel: str) -> str:
    (draft,) = compose.welcome(load_settings(), user, channels=(channel,))
    db.write(*outbox.enqueue_statement(draft))
    return draft.id


async def drain(kill_on: Any = None) -> int:
    """Run ``xswarm notify drain`` as its own process; ``kill_on``: the fake that SIGKILLs it
    once it has accepted the message. Returns the exit status."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from xswarm_tui.cli import main; main()",
        "notify",
        "drain",
        env=os.environ.copy(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if kill_on is not None:
        kill_on.kill_pid = proc.pid
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    return int(proc.returncode or 0)


async def test_sms_killed_after_twilio_accepted_is_not_sent_twice(fakes: Any, xswarm_home: Path) -> None:
    twilio, _, _ = fakes
    db = open_database(load_settings())
    try:
        row_id = _queue(db, create_user(db, name="Alice", phone=ALICE, email="alice@example.com"), "sms")
        assert await drain(kill_on=twilio) == -signal.SIGKILL
        assert len(twilio.messages) == 1
        row = outbox.get(db, row_id)
        assert row is not None and row.status == "sending"  # the commit never happened

        await asyncio.sleep(3.1)  # the lease runs out: the row comes back in doubt
        assert await drain() == 0
        assert len(twilio.messages) == 1 and twilio.list_queries == 1  # asked Twilio, sent nothing
        row = outbox.get(db, row_id)
        assert row is not None and row.status == "sent" and row.provider_id == twilio.messages[0]["sid"]
        assert row.last_error == "settled: Twilio had it"
        assert db.query("SELECT COUNT(*) FROM messages WHERE direction = 'out'") == [(1,)]
    finally:
        db.close()


async def test_sms_killed_right_after_twilios_2xx_is_sent_once(fakes: Any, xswarm_home: Path) -> None:
    """Killed just after the 2xx was written: usually before our commit (the row is then
    settled by the next run), rarely after it (then it is already sent). Exactly one message
    either way, recorded under Twilio's sid."""
    twilio, _, _ = fakes
    twilio.kill_after_answer = True
    db = open_database(load_settings())
    try:
        row_id = _queue(db, create_user(db, name="Alice", phone=ALICE, email="alice@example.com"), "sms")
        assert await drain(kill_on=twilio) == -signal.SIGKILL
        row = outbox.get(db, row_id)
        assert row is not None and row.status in ("sending", "sent")
        settled_later = row.status == "sending"
        await asyncio.sleep(3.1)
        assert await drain() == 0
        assert len(twilio.messages) == 1 and twilio.list_queries == int(settled_later)
        row = outbox.get(db, row_id)
        assert row is not None and row.status == "sent" and row.provider_id == twilio.messages[0]["sid"]
    finally:
        db.close()


async def test_sms_killed_before_twilio_answered_anything_is_sent_once(fakes: Any, xswarm_home: Path) -> None:
    """The control: a doubtful attempt that never reached Twilio IS sent by the next run."""
    twilio, _, _ = fakes
    db = open_database(load_settings())
    try:
        row_id = _queue(db, create_user(db, name="Alice", phone=ALICE, email="alice@example.com"), "sms")
        twilio.unreachable = True  # the connection drops: Twilio took nothing
        assert await drain() == 0
        row = outbox.get(db, row_id)
        assert row is not None and row.status == "failed" and row.in_doubt
        twilio.unreachable = False
        db.write("UPDATE outbox SET next_attempt_at = 0")
        assert await drain() == 0
        assert len(twilio.messages) == 1 and twilio.list_queries == 1
        row = outbox.get(db, row_id)
        assert row is not None and row.status == "sent" and row.provider_id == twilio.messages[0]["sid"]
        assert not row.in_doubt and row.last_error is None
    finally:
        db.close()


async def test_email_killed_after_sendgrid_accepted_waits_for_its_event(fakes: Any, xswarm_home: Path) -> None:
    _, sendgrid, key = fakes
    settings = load_settings()
    db = open_database(settings)
    try:
        row_id = _queue(db, create_user(db, name="Alice", phone=ALICE, email="alice@example.com"), "email")
        assert await drain(kill_on=sendgrid) == -signal.SIGKILL
        assert len(sendgrid.mails) == 1 and sendgrid.mails[0]["custom_args"] == {"xswarm_outbox": row_id}

        await asyncio.sleep(3.1)
        assert await drain() == 0
        row = outbox.get(db, row_id)
        assert row is not None and row.status == "failed" and row.in_doubt and len(sendgrid.mails) == 1
        assert "waiting for SendGrid's processed event" in (row.last_error or "")

        server = WebhooksServer(settings, db, EventBus(), process=True)
        await server.start("127.0.0.1", 0)
        try:
            assert await sendgrid.deliver_events(f"http://127.0.0.1:{server.port}/sendgrid/events", key) == 200
            await wait_until(lambda: getattr(outbox.get(db, row_id), "status", None) == "sent")
        finally:
            await server.stop()
        row = outbox.get(db, row_id)
        assert row is not None and row.provider_id == "sgmsg1" and not row.in_doubt
        db.write("UPDATE outbox SET next_attempt_at = 0")
        assert await drain() == 0
        assert len(sendgrid.mails) == 1
    finally:
        db.close()
