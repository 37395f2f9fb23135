"""Stripe state: one row per subscription (absolute state) and one row per billing event.

Why a guard on every subscription write: Stripe delivers events out of order and more than
once. A write only lands when its event is newer than the one that wrote the stored state
(``event_created``; ties broken by ``event_rank`` created < updated < deleted), so an old
event can never overwrite newer state, whatever order the processor sees them in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from engine.store.db import Database, Statement

ENTITLED = frozenset({"active", "trialing", "past_due"})
"""Statuses that keep the paid tier (past_due: Stripe is still retrying the card)."""


@dataclass(frozen=True)
class Subscription:
    id: str
    user_id: str | None
    customer_id: str | None
    status: str
    price_id: str | None
    tier: str | None
    current_period_end: int | None
    cancel_at_period_end: bool
    event_created: int
    updated_at: int


_COLUMNS = (
    "id, user_id, customer_id, status, price_id, tier, current_period_end, cancel_at_period_end,"
    " event_created, updated_at"
)


def subscription_statement(
    *,
    sub_id: str,
    user_id: str | None,
    customer_id: str | None,
    status: str,
    price_id: str | None,
    tier: str | None,
    current_period_end: int | None,
    cancel_at_period_end: bool,
    event_created: int,
    event_rank: int,
) -> Statement:
    """Upsert the whole row, guarded so only a newer event wins."""
    return (
        f"INSERT INTO subscriptions ({_COLUMNS}, event_rank) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(id) DO UPDATE SET"
        " user_id = COALESCE(excluded.user_id, subscriptions.user_id),"
        " customer_id = COALESCE(excluded.customer_id, subscriptions.customer_id),"
        " status = excluded.status, price_id = excluded.price_id, tier = excluded.tier,"
        " current_period_end = excluded.current_period_end,"
        " cancel_at_period_end = excluded.cancel_at_period_end,"
        " event_created = excluded.event_created, event_rank = excluded.event_rank,"
        " updated_at = excluded.updated_at"
        " WHERE excluded.event_created > subscriptions.event_created"
        " OR (excluded.event_created = subscriptions.event_created"
        " AND excluded.event_rank >= subscriptions.event_rank)",
        (
            sub_id,
            user_id,
            customer_id,
            status,
            price_id,
            tier,
            current_period_end,
            int(cancel_at_period_end),
            event_created,
            int(time.time() * 1000),
            event_rank,
        ),
    )


def link_statement(sub_id: str, user_id: str, customer_id: str | None, event_created: int) -> Statement:
    """Checkout completed: remember which user a subscription belongs to without touching
    its status (rank -1: any subscription event of the same second wins over it)."""
    return (
        f"INSERT INTO subscriptions ({_COLUMNS}, event_rank)"
        " VALUES (?, ?, ?, 'incomplete', NULL, NULL, NULL, 0, ?, ?, -1)"
        " ON CONFLICT(id) DO UPDATE SET user_id = COALESCE(subscriptions.user_id, excluded.user_id),"
        " customer_id = COALESCE(subscriptions.customer_id, excluded.customer_id)",
        (sub_id, user_id, customer_id, event_created, int(time.time() * 1000)),
    )


def billing_event_statement(
    *,
    event_id: str,
    user_id: str | None,
    type: str,
    amount: int | None,
    currency: str | None,
    created: int,
    summary: str,
) -> Statement:
    return (
        "INSERT INTO billing_events (id, user_id, type, amount, currency, created, summary)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
        (event_id, user_id, type, amount, currency, created, summary),
    )


def get_subscription(db: Database, sub_id: str) -> Subscription | None:
    rows = db.query(f"SELECT {_COLUMNS} FROM subscriptions WHERE id = ?", (sub_id,))
    return _row(rows[0]) if rows else None


def subscriptions_for_user(db: Database, user_id: str) -> list[Subscription]:
    rows = db.query(f"SELECT {_COLUMNS} FROM subscriptions WHERE user_id = ? ORDER BY updated_at DESC", (user_id,))
    return [_row(r) for r in rows]


def _row(row: tuple[Any, ...]) -> Subscription:
    values = list(row)
    values[7] = bool(values[7])
    return Subscription(*values)
