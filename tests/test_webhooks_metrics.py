"""``GET /metrics`` of one webhooks server: what it counts, and what it never puts in a label.

The merged view over ``--workers`` and Prometheus' own checks run in tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from webhooks_support import TWILIO_TOKEN, make_settings, post, twilio_post, wait_processed

from engine.events import EventBus
from engine.store import inbox
from engine.store.db import Database, Target
from engine.store.migrations import migrate
from webhooks.server import WebhooksServer

SENDER = "+14155550142"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Database, str, aiohttp.ClientSession]]:
    db = Database(Target(str(tmp_path / "hooks.db"))).start()
    migrate(db)
    server = WebhooksServer(make_settings(), db, EventBus())
    await server.start("127.0.0.1", 0)
    session = aiohttp.ClientSession()
    yield db, f"http://127.0.0.1:{server.port}", session
    await session.close()
    await server.stop()
    db.close()


async def scrape(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(base + "/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_requests_outcomes_and_the_inbox_are_counted(served: Any) -> None:
    db, base, session = served
    params = {"MessageSid": "SM" + "7" * 32, "From": SENDER, "To": "+14155550100", "Body": "STATUS"}
    body, headers = twilio_post(params, "/twilio/sms")
    assert (await post(session, base + "/twilio/sms", body, headers))[0] == 200
    forged = {**headers, "X-Twilio-Signature": "forged"}
    assert (await post(session, base + "/twilio/sms", body, forged))[0] == 403
    async with session.get(base + "/no/such/route") as resp:
        assert resp.status == 404
    inbox.put(db, "retired-provider", "evt-1", None, "{}").result()  # no effect knows it: a dead letter
    assert await wait_processed(db, 1)
    assert await wait_processed(db, 1, status="dead")

    text = await scrape(session, base)
    for line in (
        'xswarm_webhook_requests_total{code="200",route="/twilio/sms"} 1.0',
        'xswarm_webhook_requests_total{code="403",route="/twilio/sms"} 1.0',
        'xswarm_webhook_requests_total{code="404",route="unmatched"} 1.0',
        'xswarm_webhook_request_duration_seconds_count{route="/twilio/sms"} 2.0',
        'xswarm_webhook_events_processed_total{outcome="done",provider="twilio-sms"} 1.0',
        'xswarm_webhook_events_processed_total{outcome="dead",provider="retired-provider"} 1.0',
        'xswarm_webhook_inbox_events{status="dead"} 1.0',
        'xswarm_webhook_inbox_events{status="pending"} 0.0',
        'xswarm_notify_outbox_messages{status="dead"} 0.0',
    ):
        assert line in text.splitlines(), line
    assert SENDER not in text and SENDER[1:] not in text and TWILIO_TOKEN not in text


async def test_the_oldest_open_event_has_an_age(served: Any) -> None:
    db, base, session = served
    assert "xswarm_webhook_inbox_oldest_open_age_seconds 0.0" in await scrape(session, base)
    old = inbox.now_ms() - 120_000
    db.write(
        "INSERT INTO webhook_inbox (provider, event_id, event_type, received_at, payload, next_attempt_at)"
        " VALUES ('stripe', 'evt_late', NULL, ?, '{}', ?)",
        (old, inbox.now_ms() + 3_600_000),  # held back an hour: the processor leaves it alone
    )
    text = await scrape(session, base)
    age = float(
        next(li for li in text.splitlines() if li.startswith("xswarm_webhook_inbox_oldest_open_age_seconds ")).split()[
            1
        ]
    )
    assert 119 <= age <= 180
    assert 'xswarm_webhook_inbox_events{status="pending"} 1.0' in text


async def test_dead_notifications_are_a_gauge(served: Any) -> None:
    db, base, session = served
    db.write(
        "INSERT INTO outbox (id, kind, channel, to_addr, body, status, attempts, created_at)"
        " VALUES ('welcome:u1:sms', 'welcome', 'sms', '+14155550123', 'hi', 'dead', 8, 0)"
    )
    text = await scrape(session, base)
    assert 'xswarm_notify_outbox_messages{status="dead"} 1.0' in text.splitlines()
    assert "+14155550123" not in text
