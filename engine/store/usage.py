"""Usage counting (SMS, email, voice seconds per user and month) and call-row updates.

Why a ledger: providers retry and our processor retries, so a plain ``+1`` would count twice.
Each counted thing has a key (``sms:<MessageSid>``, ``call:<CallSid>``); the increment runs in
the same transaction as the ledger insert and only while the key is not yet recorded, so
counting is idempotent without read-modify-write races.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from engine.store.db import Database, Statement

Kind = Literal["sms", "email", "voice"]
_COLUMN: dict[str, str] = {"sms": "sms_count", "email": "email_count", "voice": "voice_seconds"}


@dataclass(frozen=True)
class Usage:
    period: str
    voice_seconds: float = 0.0
    sms_count: int = 0
    email_count: int = 0

    @property
    def voice_minutes(self) -> float:
        return self.voice_seconds / 60.0


def period_of(at_ms: int | None = None) -> str:
    """The billing period ("YYYY-MM", UTC) a moment falls in."""
    moment = (at_ms if at_ms is not None else time.time() * 1000) / 1000
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m")


def count_statements(kind: Kind, key: str, user_id: str, amount: float, at_ms: int) -> list[Statement]:
    """Statements (for ``Database.submit_script``, in this order) that count ``amount`` once
    per ``key``: the increment runs only while the key is not in the ledger, then the key is
    recorded. The second statement depends on nothing else, so a caller may move it later in
    the same transaction (and merge several into one)."""
    column = _COLUMN[kind]
    period = period_of(at_ms)
    return [
        (
            f"INSERT INTO usage (user_id, period, {column}) SELECT ?, ?, ?"
            " WHERE NOT EXISTS (SELECT 1 FROM usage_ledger WHERE key = ?)"
            f" ON CONFLICT(user_id, period) DO UPDATE SET {column} = {column} + excluded.{column}",
            (user_id, period, amount, key),
        ),
        (
            "INSERT INTO usage_ledger (key, user_id, period, at) VALUES (?, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
            (key, user_id, period, at_ms),
        ),
    ]


def usage_for(db: Database, user_id: str, period: str | None = None) -> Usage:
    period = period or period_of()
    rows = db.query(
        "SELECT voice_seconds, sms_count, email_count FROM usage WHERE user_id = ? AND period = ?",
        (user_id, period),
    )
    if not rows:
        return Usage(period)
    voice, sms, email = rows[0]
    return Usage(period, float(voice or 0), int(sms or 0), int(email or 0))


def calls_today(db: Database, user_id: str, now_ms: int | None = None) -> int:
    """Calls the user started since midnight UTC."""
    moment = (now_ms if now_ms is not None else int(time.time() * 1000)) / 1000
    day = datetime.fromtimestamp(moment, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = db.query(
        "SELECT COUNT(*) FROM calls WHERE user_id = ? AND started_at >= ?", (user_id, int(day.timestamp() * 1000))
    )
    return int(rows[0][0])


def call_status_statement(
    call_id: str,
    *,
    status: str,
    user_id: str | None,
    caller: str | None,
    at_ms: int,
    duration_s: float | None,
    end_reason: str | None,
) -> Statement:
    """Upsert a call row from a Twilio status callback.

    The bridge normally creates the row when the stream starts; a call that never reached the
    bridge (voicemail, refused, busy) gets its row here. An ended call stays ended: a late
    ``ringing``/``in-progress`` callback never reopens it."""
    ended = end_reason is not None
    return (
        "INSERT INTO calls (id, user_id, caller, source, status, started_at, ended_at, end_reason, duration_s)"
        " VALUES (?, ?, ?, 'twilio', ?, ?, ?, ?, ?)"
        " ON CONFLICT(id) DO UPDATE SET"
        " user_id = COALESCE(calls.user_id, excluded.user_id),"
        " caller = COALESCE(calls.caller, excluded.caller),"
        " status = CASE WHEN calls.status = 'ended' THEN 'ended' ELSE excluded.status END,"
        " ended_at = COALESCE(excluded.ended_at, calls.ended_at),"
        " end_reason = COALESCE(excluded.end_reason, calls.end_reason),"
        " duration_s = COALESCE(excluded.duration_s, calls.duration_s)",
        (
            call_id,
            user_id,
            caller,
            "ended" if ended else status,
            at_ms,
            at_ms if ended else None,
            end_reason,
            duration_s,
        ),
    )


def call_user(db: Database, call_id: str) -> str | None:
    rows = db.query("SELECT user_id FROM calls WHERE id = ?", (call_id,))
    return rows[0][0] if rows else None
