"""``POST /stripe/webhook``: subscriptions → tiers, payments → billing events.

Stripe delivers out of order and more than once. Dedupe is the inbox key (event id);
ordering is the guarded upsert in ``engine.store.billing``; the user's tier is then derived
from ALL their stored subscriptions (never from the event alone), so whatever order the
events arrive in, the tier converges to the state of the newest events.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from engine.events import PaymentStatusChanged
from engine.notify import compose
from engine.store import billing
from engine.store.db import Database
from engine.store.inbox import InboxRow
from engine.store.outbox import enqueue_statement
from engine.store.users import User, find_by_stripe_customer, get_user, set_stripe_customer, set_tier
from engine.tiers import TIERS
from webhooks.body import read_body
from webhooks.hub import HUB, Hub, Outcome
from webhooks.processor import PermanentError, received

log = logging.getLogger("xswarm.webhooks.stripe")
PROVIDER = "stripe"
RANK = {"customer.subscription.created": 0, "customer.subscription.updated": 1, "customer.subscription.deleted": 2}
_ORDER = list(TIERS)  # free < personal < professional < enterprise < admin
_LOCK = "stripe-lock"


async def route(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    raw = await read_body(request)
    event = hub.stripe.check(raw, request.headers.get("Stripe-Signature"))
    await hub.ingest(PROVIDER, event["id"], event["type"], raw.decode("utf-8"))
    return web.json_response({"received": True})


def _customer_user(db: Database, customer: Any, fallback_user_id: str | None) -> User | None:
    if isinstance(customer, str):
        user = find_by_stripe_customer(db, customer)
        if user is not None:
            return user
    return get_user(db, fallback_user_id) if fallback_user_id else None


def entitled_tier(db: Database, user: User) -> str:
    """The best tier any live subscription of the user pays for; ``free`` without one."""
    best = "free"
    for sub in billing.subscriptions_for_user(db, user.id):
        if sub.status in billing.ENTITLED and sub.tier in TIERS and _ORDER.index(sub.tier) > _ORDER.index(best):
            best = sub.tier
    return best


def _apply_tier(db: Database, user: User) -> str:
    """Set the derived tier (admins are never changed by billing); returns the tier."""
    if user.tier == "admin":
        return user.tier
    wanted = entitled_tier(db, user)
    if wanted != user.tier:
        set_tier(db, user.id, wanted)
    return wanted


async def effect(hub: Hub, row: InboxRow) -> Outcome:
    try:
        event = json.loads(row.payload)
        obj = event["data"]["object"]
        created = int(event["created"])
    except (ValueError, KeyError, TypeError):
        raise PermanentError("stored Stripe event is not an event object") from None
    lock: asyncio.Lock = hub.state.setdefault(_LOCK, asyncio.Lock())
    async with lock:  # tier derivation reads then writes: one Stripe event at a time
        kind = row.event_type or ""
        if kind in RANK:
            return await _subscription(hub, row, obj, created)
        if kind == "checkout.session.completed":
            return await _checkout(hub, row, obj, created)
        if kind in ("invoice.paid", "invoice.payment_failed"):
            return await _invoice(hub, row, obj, created)
    return Outcome([], [received(row, f"Stripe {kind} (ignored)")])


async def _subscription(hub: Hub, row: InboxRow, sub: dict[str, Any], created: int) -> Outcome:
    kind = row.event_type or ""
    meta = sub.get("metadata") or {}
    user = await hub.read(lambda d: _customer_user(d, sub.get("customer"), meta.get("user_id")))
    if user is None:
        stored = await hub.read(lambda d: billing.get_subscription(d, sub["id"]))
        owner = stored.user_id if stored is not None else None
        if owner:
            user = await hub.read(lambda d: get_user(d, owner))
    items = (sub.get("items") or {}).get("data") or [{}]
    price_id = ((items[0] or {}).get("price") or {}).get("id")
    tier = hub.settings.stripe.price_tiers.get(price_id) if price_id else None
    if tier is not None and tier not in TIERS:
        log.error("settings.stripe.price_tiers maps %s to unknown tier %r", price_id, tier)
        tier = None
    status = "canceled" if kind.endswith(".deleted") else str(sub.get("status", "incomplete"))
    period_end = sub.get("current_period_end") or (items[0] or {}).get("current_period_end")
    upsert = billing.subscription_statement(
        sub_id=sub["id"],
        user_id=user.id if user else None,
        customer_id=sub.get("customer") if isinstance(sub.get("customer"), str) else None,
        status=status,
        price_id=price_id,
        tier=tier,
        current_period_end=int(period_end) if period_end else None,
        cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
        event_created=created,
        event_rank=RANK[kind],
    )
    note = billing.billing_event_statement(
        event_id=row.event_id,
        user_id=user.id if user else None,
        type=kind,
        amount=None,
        currency=None,
        created=created,
        summary=f"subscription {sub['id']} {status} ({price_id or 'no price'})",
    )
    # Commit the subscription state first: the tier is derived from what is stored.
    await asyncio.wrap_future(hub.db.submit_script([upsert, note]))
    # set_tier waits for its write, so it runs on the reader pool, never on the loop.
    new_tier = await hub.db.aread(lambda d: _apply_tier(d, user)) if user else None
    summary = f"Subscription {status}" + (f" → {new_tier}" if new_tier else " (no matching user)")
    return Outcome(
        [],
        [
            PaymentStatusChanged(user.id if user else None, status, new_tier),
            received(row, summary, user.id if user else None),
        ],
    )


async def _checkout(hub: Hub, row: InboxRow, session: dict[str, Any], created: int) -> Outcome:
    user_id = session.get("client_reference_id") or (session.get("metadata") or {}).get("user_id")
    customer = session.get("customer") if isinstance(session.get("customer"), str) else None
    user = await hub.read(lambda d: _customer_user(d, customer, user_id))
    if user is not None and customer and user.stripe_customer_id != customer:
        try:
            await hub.db.aread(lambda d: set_stripe_customer(d, user.id, customer))
        except ValueError as exc:  # the customer is already someone else's: keep both as they are
            log.error("checkout %s: %s", session.get("id"), exc)
    statements = []
    sub_id = session.get("subscription")
    if user is not None and isinstance(sub_id, str):
        statements.append(billing.link_statement(sub_id, user.id, customer, created))
    statements.append(
        billing.billing_event_statement(
            event_id=row.event_id,
            user_id=user.id if user else None,
            type=row.event_type or "",
            amount=session.get("amount_total"),
            currency=session.get("currency"),
            created=created,
            summary=f"checkout {session.get('payment_status', '')}",
        )
    )
    await asyncio.wrap_future(hub.db.submit_script(statements))
    # A subscription event that arrived before this one had no user to give its tier to.
    new_tier = await hub.db.aread(lambda d: _apply_tier(d, user)) if user else None
    status = "checkout_" + str(session.get("payment_status") or "completed")
    return Outcome(
        [],
        [
            PaymentStatusChanged(user.id if user else None, status, new_tier),
            received(row, f"Checkout {status}", user.id if user else None),
        ],
    )


async def _invoice(hub: Hub, row: InboxRow, invoice: dict[str, Any], created: int) -> Outcome:
    paid = row.event_type == "invoice.paid"
    user = await hub.read(
        lambda d: _customer_user(d, invoice.get("customer"), (invoice.get("metadata") or {}).get("user_id"))
    )
    amount = invoice.get("amount_paid") if paid else invoice.get("amount_due")
    status = "paid" if paid else "payment_failed"
    attempt = "" if paid else f", attempt {invoice.get('attempt_count', 1)}"
    statement = billing.billing_event_statement(
        event_id=row.event_id,
        user_id=user.id if user else None,
        type=row.event_type or "",
        amount=amount,
        currency=invoice.get("currency"),
        created=created,
        summary=f"invoice {invoice.get('id', '')} {status}{attempt}",
    )
    money = f"{(amount or 0) / 100:.2f} {str(invoice.get('currency') or '').upper()}".strip()
    summary = f"Invoice {status}: {money}{attempt}"
    notices = []
    if not paid and user is not None:
        # Once per (invoice, attempt): Stripe's retries of the card each get one notice.
        drafts = compose.payment_failed(
            hub.settings,
            user,
            invoice_id=str(invoice.get("id") or row.event_id),
            attempt=int(invoice.get("attempt_count") or 1),
            amount=money,
        )
        notices = [enqueue_statement(d) for d in drafts]
    return Outcome(
        [statement, *notices],
        [
            PaymentStatusChanged(user.id if user else None, status, user.tier if user else None),
            received(row, summary, user.id if user else None),
        ],
        notify=bool(notices),
    )
