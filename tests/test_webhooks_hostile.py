"""Hostile webhook traffic, each attack reproduced against a real server (issue 13).

Every test here failed before its fix: refused bodies kept alive, forms parsed and HMACed
whole before any cap, a failed signature check paid for three HMACs, the rate limit keyed on
a shared proxy address, no body timeout, ``/health`` "ok" while writes failed, a deeply
nested SendGrid body answered 500, a Stripe list ``data.object`` retried, the inbox kept
forever."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from test_webhooks import alice, db, fakes, make, sms
from twilio.request_validator import RequestValidator
from webhooks_support import SendGridKey, post, stripe_event, stripe_post, twilio_post, wait_processed

from engine.ratelimit import RateLimit
from engine.store import inbox
from engine.store.db import Database, StoreError

__all__ = ["alice", "db", "fakes", "make"]  # fixtures shared with test_webhooks

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def collector_off() -> Iterator[None]:
    """As in a worker after ``tune_server_process``: cyclic garbage is collected rarely, if at all."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_refused_bodies_are_freed_at_once(db: Database, make: Any, collector_off: None) -> None:
    key = SendGridKey()
    h = await make(sendgrid={"webhook_public_key": key.public_b64}, server_kw={"rate_limit": None})
    body = b"x" * (8 * 1024 * 1024)
    headers = {**key.headers(b"something else"), "Content-Type": "multipart/form-data; boundary=x"}
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(8):
            status, _ = await post(h.session, h.base + "/sendgrid/inbound", body, headers)
            assert status == 403
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 3 * len(body), f"{grown / 2**20:.0f} MiB still held after 8 refused 8 MiB bodies"


async def test_a_form_with_too_many_fields_is_refused_before_any_hmac(
    db: Database, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hmacs = []
    real = RequestValidator.compute_signature
    monkeypatch.setattr(
        RequestValidator, "compute_signature", lambda self, *a, **kw: hmacs.append(1) or real(self, *a, **kw)
    )
    h = await make(server_kw={"rate_limit": None})
    headers = {"X-Twilio-Signature": "forged", "Content-Type": FORM}
    status, text = await post(h.session, h.base + "/twilio/sms", b"&".join([b"a=1"] * 5000), headers)
    assert status == 400 and "form fields" in text and hmacs == []
    status, text = await post(h.session, h.base + "/twilio/sms", b"a=1&" * 100_000, headers)
    assert status == 413 and hmacs == []
    status, _ = await post(h.session, h.base + "/twilio/sms", b"x" * 65 + b"=1", headers)
    assert status == 400 and hmacs == []
    # a plausible form with a wrong signature: each URL variant HMACed once (the SDK's
    # validate() after a first miss made it three)
    status, _ = await post(h.session, h.base + "/twilio/sms", b"From=%2B1&Body=hi", headers)
    assert status == 403 and len(hmacs) == 2


async def _answer_without_body(port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 30000000\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readline(), 5)  # answered without sending a byte of body
    writer.close()
    return head


async def test_unsigned_requests_are_refused_before_the_body_is_read(db: Database, make: Any) -> None:
    h = await make(sendgrid={"webhook_public_key": SendGridKey().public_b64}, server_kw={"rate_limit": None})
    for path in ("/twilio/sms", "/twilio/voice", "/sendgrid/inbound", "/sendgrid/events", "/stripe/webhook"):
        head = await _answer_without_body(h.server.port, path)
        assert head.startswith(b"HTTP/1.1 403"), (path, head)
    unconfigured = await make(server_kw={"rate_limit": None})  # no SendGrid key: 503, also before the body
    assert (await _answer_without_body(unconfigured.server.port, "/sendgrid/inbound")).startswith(b"HTTP/1.1 503")


async def test_a_sendgrid_signature_that_cannot_be_right_is_refused_before_the_body_is_read(
    db: Database, make: Any
) -> None:
    key = SendGridKey()
    h = await make(sendgrid={"webhook_public_key": key.public_b64}, server_kw={"rate_limit": None})
    good = key.headers(b"mail")
    stale = key.headers(b"mail", timestamp=int(time.time()) - 3600)
    for headers in (
        {**good, "X-Twilio-Email-Event-Webhook-Signature": "x"},  # not base64
        {**good, "X-Twilio-Email-Event-Webhook-Signature": "AAAA"},  # base64, not DER
        stale,
    ):
        for path in ("/sendgrid/inbound", "/sendgrid/events"):
            head = await _answer_without_body(h.server.port, path, headers)
            assert head.startswith(b"HTTP/1.1 403"), (path, headers, head)


async def test_a_forged_mail_is_checked_without_copying_its_body(db: Database, make: Any) -> None:
    """A well-formed signature over other bytes must be read to be refused; it is hashed as it
    arrives, never copied whole (each whole copy of 29 MiB held every other request up)."""
    key = SendGridKey()
    h = await make(sendgrid={"webhook_public_key": key.public_b64}, server_kw={"rate_limit": None})
    body = b"x" * (16 * 1024 * 1024)
    headers = {**key.headers(b"other bytes"), "Content-Type": "multipart/form-data; boundary=x"}
    tracemalloc.start()
    try:
        status, _ = await post(h.session, h.base + "/sendgrid/inbound", body, headers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 403
    assert peak < 2.5 * len(body), f"refusing a 16 MiB mail peaked at {peak / 2**20:.0f} MiB"


async def test_behind_a_trusted_proxy_the_limit_keys_on_the_forwarded_client(
    db: Database, alice: Any, make: Any
) -> None:
    h = await make(server={"trusted_proxies": ["127.0.0.1"]}, server_kw={"rate_limit": RateLimit(1.0, 3.0)})
    attacker = {"X-Twilio-Signature": "forged", "Content-Type": FORM, "X-Forwarded-For": "203.0.113.9"}
    codes = [(await post(h.session, h.base + "/twilio/sms", b"Body=x", attacker))[0] for _ in range(6)]
    assert codes[-1] == 429
    for i in range(5):  # Twilio, through the same proxy
        body, headers = twilio_post(sms("help", sid=f"SM{i}"), "/twilio/sms")
        status, _ = await post(h.session, h.base + "/twilio/sms", body, {**headers, "X-Forwarded-For": "54.172.60.1"})
        assert status == 200
    # a client that is not a trusted proxy cannot pick its own source with the header
    spoofer = {**attacker, "X-Forwarded-For": "198.51.100.1"}
    other = await make(server={"trusted_proxies": ["10.0.0.0/8"]}, server_kw={"rate_limit": RateLimit(1.0, 3.0)})
    codes = []
    for i in range(6):
        spoofer["X-Forwarded-For"] = f"198.51.100.{i}"
        codes.append((await post(other.session, other.base + "/twilio/sms", b"Body=x", spoofer))[0])
    assert codes[-1] == 429


async def test_a_slow_body_is_cut_off(db: Database, make: Any) -> None:
    h = await make(server={"request_timeout_s": 0.5}, server_kw={"rate_limit": None})
    reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
    head = f"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: s\r\nContent-Type: {FORM}\r\n"
    writer.write((head + "Content-Length: 1000\r\n\r\nBody=").encode())
    await writer.drain()
    started = time.monotonic()
    line = await asyncio.wait_for(reader.readline(), 10)
    assert line.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3
    writer.close()


async def test_health_is_not_ok_while_writes_fail(db: Database, alice: Any, make: Any) -> None:
    h = await make()
    with pytest.raises(StoreError):  # a bad statement is not a storage fault
        await asyncio.wrap_future(db.submit("INSERT INTO users (id) VALUES (NULL)"))
    async with h.session.get(h.base + "/health") as resp:
        assert resp.status == 200
    await asyncio.wrap_future(db.submit("PRAGMA query_only = ON"))  # the writer's file turns read-only
    assert (await h.twilio("/twilio/sms", sms("help")))[0] == 503
    async with h.session.get(h.base + "/health") as resp:
        body = await resp.json()
        assert resp.status == 503 and "writes failing" in body["database"] and "readonly" in body["database"]


async def test_deeply_nested_sendgrid_json_is_a_400(db: Database, make: Any) -> None:
    key = SendGridKey()
    h = await make(sendgrid={"webhook_public_key": key.public_b64})
    for body in (b"[" * 100_000 + b"]" * 100_000, b'[{"sg_event_id":"e1","x":' + b"[" * 5000 + b"]" * 5000 + b"}]"):
        status, _ = await post(h.session, h.base + "/sendgrid/events", body, key.headers(body))
        assert status == 400
    assert db.query("SELECT COUNT(*) FROM webhook_inbox")[0][0] == 0


async def test_a_stripe_event_whose_object_is_a_list_is_dead_lettered(db: Database, make: Any) -> None:
    h = await make()
    body, headers = stripe_post(stripe_event("evt_list", "customer.subscription.updated", [], int(time.time())))  # type: ignore[arg-type]
    status, _ = await post(h.session, h.base + "/stripe/webhook", body, headers)
    assert status == 200
    rows = await wait_processed(db, 1, status="dead")
    assert [(r.event_id, r.attempts) for r in rows] == [("evt_list", 1)] and "not an object" in (
        rows[0].last_error or ""
    )


async def test_processed_events_are_pruned_after_the_retention(db: Database, make: Any) -> None:
    h = await make(server={"inbox_retention_days": 30})
    day = 86_400_000
    now = inbox.now_ms()
    rows = [
        ("old-done", "done", now - 31 * day),
        ("old-dead", "dead", now - 31 * day),
        ("recent-done", "done", now - 29 * day),
    ]
    for event_id, status, at in rows:
        await asyncio.wrap_future(
            db.submit(
                "INSERT INTO webhook_inbox (provider, event_id, event_type, received_at, payload, status, attempts)"
                " VALUES ('test', ?, 'x', ?, '{}', ?, 1)",
                (event_id, at, status),
            )
        )
    assert await h.server.prune_inbox() == 1
    left = {r[0] for r in db.query("SELECT event_id FROM webhook_inbox WHERE provider = 'test'")}
    assert left == {"old-dead", "recent-done"}  # dead letters wait for the operator


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        (None, "127.0.0.1"),
        ("203.0.113.9", "203.0.113.9"),
        ("198.51.100.1, 203.0.113.9, 10.0.0.5", "203.0.113.9"),  # the rightmost hop no proxy of ours added
        ("not-an-address", "127.0.0.1"),
        ("10.0.0.5", "127.0.0.1"),  # only trusted hops: the connecting proxy itself
    ],
)
def test_the_source_behind_trusted_proxies(forwarded: str | None, expected: str) -> None:
    from aiohttp.test_utils import make_mocked_request

    from webhooks.limits import client_address, networks

    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    transport = type("T", (), {"get_extra_info": lambda self, name, default=None: ("127.0.0.1", 5555)})()
    request = make_mocked_request("POST", "/twilio/sms", headers=headers, transport=transport)
    assert client_address(request, networks(["127.0.0.1", "10.0.0.0/8"])) == expected
    assert client_address(request, ()) == "127.0.0.1"  # no trusted proxies: the header means nothing


async def test_a_replayed_voice_webhook_mints_no_more_tokens(db: Database, alice: Any, make: Any) -> None:
    """Issue 13, item 7: each replay of a captured signed ``/twilio/voice`` POST minted a new
    valid token. A retry while the first answer's token may still be in use (Twilio falling
    back to the same URL) is answered again; a replay after that is hung up."""
    from test_webhooks import call

    from engine.store import nodes

    nodes.heartbeat(
        db, "node-a", bridge_url="wss://a.example.com", model="echo", slots_total=4, slots_free=4,
        step_ms_p99=None, started_at=0,
    ).result()  # fmt: skip
    h = await make()
    first = await h.twilio("/twilio/voice", call())
    retry = await h.twilio("/twilio/voice", call())
    assert first[0] == retry[0] == 200 and "<Stream" in first[1] and "<Stream" in retry[1]
    await asyncio.wrap_future(
        db.submit("UPDATE webhook_inbox SET received_at = received_at - 120000 WHERE event_id = 'CA0001'")
    )
    status, text = await h.twilio("/twilio/voice", call())
    assert status == 200 and "<Hangup" in text and "<Stream" not in text and "token" not in text


def test_the_refusal_limiter_stays_bounded_under_many_sources() -> None:
    from engine.ratelimit import RateLimit
    from webhooks.limits import RateLimiter

    limiter = RateLimiter(RateLimit(1.0, 2.0), max_sources=3)
    for i in range(10):
        limiter.charge("twilio", f"198.51.100.{i}", now=float(i))
    assert len(limiter._buckets) <= 3
    limiter.charge("twilio", "203.0.113.1", 2.0, now=100.0)
    assert limiter.exhausted("twilio", "203.0.113.1", now=100.0)
    assert not limiter.exhausted("twilio", "203.0.113.1", now=102.0)
