"""SMS, email and voicemail messages, both directions, keyed by the provider's id.

``provider_id`` is UNIQUE, so storing a message is idempotent (``ON CONFLICT DO NOTHING``) and
a retried webhook never stores it twice. Delivery status only moves forward
(processed → deferred → delivered → open → click, or a terminal failure): SendGrid events
arrive out of order and a late ``processed`` must not hide a ``delivered``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from engine.store.db import Database, Statement

Channel = Literal["sms", "email", "voicemail"]
Direction = Literal["in", "out"]

STATUS_RANK: dict[str, int] = {
    "received": 0,
    "queued": 0,
    "sent": 1,
    "processed": 1,
    "deferred": 2,
    "delivered": 3,
    "open": 4,
    "click": 5,
    "bounce": 6,
    "dropped": 6,
    "spamreport": 6,
    "unsubscribe": 6,
    "group_unsubscribe": 6,
    "group_resubscribe": 6,
    "failed": 6,
}


@dataclass(frozen=True)
class Message:
    id: str
    user_id: str | None
    channel: str
    direction: str
    provider_id: str | None
    from_addr: str | None
    to_addr: str | None
    subject: str | None
    body: str | None
    status: str | None
    meta: dict[str, Any]
    created_at: int
    updated_at: int


_COLUMNS = (
    "id, user_id, channel, direction, provider_id, from_addr, to_addr, subject, body, status, meta,"
    " created_at, updated_at"
)


def insert_statement(
    *,
    channel: Channel,
    direction: Direction,
    provider_id: str,
    user_id: str | None,
    from_addr: str | None,
    to_addr: str | None,
    body: str | None,
    status: str,
    subject: str | None = None,
    meta: dict[str, Any] | None = None,
    at_ms: int | None = None,
) -> Statement:
    at = at_ms if at_ms is not None else int(time.time() * 1000)
    return (
        f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(provider_id) DO NOTHING",
        (
            uuid.uuid4().hex,
            user_id,
            channel,
            direction,
            provider_id,
            from_addr,
            to_addr,
            subject,
            body,
            status,
            json.dumps(meta or {}, separators=(",", ":")),
            at,
            at,
        ),
    )


_RANK_CASE = "CASE status " + " ".join(f"WHEN '{s}' THEN {r}" for s, r in STATUS_RANK.items()) + " ELSE 0 END"


def status_statement(provider_id: str, status: str, at_ms: int | None = None) -> Statement:
    """Move a message's delivery status forward (never back)."""
    at = at_ms if at_ms is not None else int(time.time() * 1000)
    return (
        f"UPDATE messages SET status = ?, updated_at = ? WHERE provider_id = ? AND {_RANK_CASE} <= ?",
        (status, at, provider_id, STATUS_RANK.get(status, 0)),
    )


def body_statement(provider_id: str, body: str) -> Statement:
    """Fill in a message's text afterwards (a voicemail's transcript)."""
    return (
        "UPDATE messages SET body = ?, updated_at = ? WHERE provider_id = ?",
        (body, int(time.time() * 1000), provider_id),
    )


def _row(row: tuple[Any, ...]) -> Message:
    values = list(row)
    values[10] = json.loads(values[10]) if values[10] else {}
    return Message(*values)


def get_by_provider_id(db: Database, provider_id: str) -> Message | None:
    rows = db.query(f"SELECT {_COLUMNS} FROM messages WHERE provider_id = ?", (provider_id,))
    return _row(rows[0]) if rows else None


def recent(db: Database, *, user_id: str | None = None, channel: str | None = None, limit: int = 50) -> list[Message]:
    """Newest first, optionally for one user or one channel (sms, email, voicemail)."""
    where: list[str] = []
    params: list[object] = []
    if user_id is not None:
        where.append("user_id = ?")
        params.append(user_id)
    if channel is not None:
        where.append("channel = ?")
        params.append(channel)
    sql = f"SELECT {_COLUMNS} FROM messages"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC LIMIT ?"
    return [_row(r) for r in db.query(sql, (*params, int(limit)))]


def get(db: Database, message_id: str) -> Message | None:
    """One message by our id or the provider's (a voicemail's RecordingSid)."""
    rows = db.query(f"SELECT {_COLUMNS} FROM messages WHERE id = ? OR provider_id = ?", (message_id, message_id))
    return _row(rows[0]) if rows else None
