"""``xswarm billing link|portal`` against a local fake Stripe, and the whole subscription loop:
link → the customer pays at (fake) Stripe → Stripe's signed ``checkout.session.completed`` and
``customer.subscription.created`` reach our webhook → the user's tier."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from typer.testing import CliRunner

from engine.config import load_settings
from engine.events import EventBus
from engine.store.migrations import open_database
from engine.store.users import find_by_email
from tests.provider_fakes import FakeStripe, FakeTwilio, wait_until
from tests.webhooks_support import PUBLIC_URL, STRIPE_SECRET
from webhooks.server import WebhooksServer
from xswarm_tui.cli import app

runner = CliRunner()
OUR_NUMBER = "+14155550199"


async def invoke(*args: str) -> Any:
    """The CLI in a thread: its commands run their own event loops."""
    return await asyncio.to_thread(runner.invoke, app, list(args), catch_exceptions=False)


@pytest.fixture
async def stripe_api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeStripe]:
    fake = await FakeStripe().start()
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_fake")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET)
    monkeypatch.setenv("XSWARM_STRIPE__API_BASE", fake.url)
    monkeypatch.setenv(
        "XSWARM_STRIPE__PRICE_TIERS", json.dumps({"price_personal": "personal", "price_pro": "professional"})
    )
    monkeypatch.setenv("XSWARM_PUBLIC_URL", PUBLIC_URL)
    yield fake
    await fake.stop()


async def add_alice() -> str:
    result = await invoke("users", "add", "--name", "Alice", "--phone", "+14155550101", "--email", "alice@example.com")
    assert result.exit_code == 0
    return result.stdout.split()[2]


async def test_link_checkout_and_signed_events_give_the_user_the_tier(stripe_api: FakeStripe) -> None:
    user_id = await add_alice()
    result = await invoke("billing", "link", "alice@example.com", "--tier", "personal")
    assert result.exit_code == 0
    url = result.stdout.strip().splitlines()[-1]
    session = stripe_api.session_for(url)  # the URL printed is the one Stripe returned

    customer_req, session_req = stripe_api.requests
    assert customer_req["path"] == "/v1/customers" and customer_req["form"]["metadata[user_id]"] == user_id
    assert customer_req["auth"] == "Bearer sk_test_fake" and customer_req["key"].startswith("xswarm-customer-")
    form = session_req["form"]
    assert form["mode"] == "subscription" and form["line_items[0][price]"] == "price_personal"
    assert form["client_reference_id"] == user_id and form["metadata[user_id]"] == user_id
    assert form["subscription_data[metadata][user_id]"] == user_id
    assert form["customer"] == session["customer"] and form["success_url"].startswith(PUBLIC_URL)

    settings = load_settings()
    db = open_database(settings)
    server = WebhooksServer(settings, db, EventBus())
    await server.start("127.0.0.1", 0)
    try:
        alice = find_by_email(db, "alice@example.com")
        assert alice is not None and alice.stripe_customer_id == session["customer"] and alice.tier == "free"
        answers = await stripe_api.complete(session["id"], f"http://127.0.0.1:{server.port}/stripe/webhook")
        assert answers == [200, 200]
        await wait_until(lambda: getattr(find_by_email(db, "alice@example.com"), "tier", None) == "personal")
    finally:
        await server.stop()
        db.close()

    # The next link reuses the customer: no second customer at Stripe.
    again = await invoke("billing", "link", user_id, "--tier", "professional")
    assert again.exit_code == 0
    assert [r["path"] for r in stripe_api.requests].count("/v1/customers") == 1
    assert stripe_api.requests[-1]["form"]["customer"] == session["customer"]
    assert stripe_api.requests[-1]["form"]["line_items[0][price]"] == "price_pro"

    portal = await invoke("billing", "portal", "alice@example.com")
    assert portal.exit_code == 0 and portal.stdout.strip().splitlines()[-1].startswith("https://billing.stripe.test/")
    assert stripe_api.requests[-1]["form"] == {"customer": session["customer"], "return_url": PUBLIC_URL}


async def test_unknown_user_or_tier_without_a_price_is_one_line_and_exit_1(stripe_api: FakeStripe) -> None:
    await add_alice()
    for args in (
        ("billing", "link", "nobody@example.com", "--tier", "personal"),
        ("billing", "link", "alice@example.com", "--tier", "enterprise"),
        ("billing", "link", "alice@example.com", "--tier", "no-such-tier"),
    ):
        result = await invoke(*args)
        assert result.exit_code == 1, args
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "no price in stripe.price_tiers" in result.stderr
    no_twilio = await invoke("billing", "link", "alice@example.com", "--tier", "personal", "--send", "sms")
    assert no_twilio.exit_code == 1 and "cannot sms the link" in no_twilio.stderr
    assert stripe_api.requests == []  # nothing was created at Stripe
    portal = await invoke("billing", "portal", "alice@example.com")
    assert portal.exit_code == 1 and "no Stripe customer yet" in portal.stderr


async def test_link_sent_by_sms_goes_through_the_outbox_uncut(
    stripe_api: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    twilio = await FakeTwilio().start()
    try:
        monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC0123")
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", "token")
        monkeypatch.setenv("TWILIO_FROM_NUMBER", OUR_NUMBER)
        monkeypatch.setenv("XSWARM_TWILIO__API_BASE", twilio.url)
        await add_alice()
        result = await invoke("billing", "link", "alice@example.com", "--tier", "personal", "--send", "sms")
        assert result.exit_code == 0 and "sms: sent" in result.stderr
        url = result.stdout.strip().splitlines()[-1]
        (message,) = twilio.messages
        assert message["to"] == "+14155550101" and message["from"] == OUR_NUMBER
        assert message["body"].endswith(url) and len(url) > 160  # a link is never cut
        listed = await invoke("notify", "list")
        assert "billing:" in listed.stdout and " sent " in listed.stdout
    finally:
        await twilio.stop()
