"""Call lifecycle rows in ``calls``: written when a call goes live and when it ends.

The voice webhook may already have inserted the row (status ``ringing``, keyed by CallSid),
so going live is an upsert that keeps the webhook's ``started_at`` and ``user_id``. A call
re-routed after its node went away goes live again on another node: the same row, its
``node_id`` and status updated, and an end the old node may have written is cleared. Writes are
queued on the database's writer thread; the runtime loop never waits for them.
"""

from __future__ import annotations

import time
from typing import Any

from engine.store.db import Database


def record_live(
    db: Database,
    *,
    call_id: str,
    stream_sid: str | None,
    user_id: str | None,
    caller: str | None,
    source: str,
    node_id: str,
    slot: int,
    theme: str | None,
    started_at: float,
) -> Any:
    return db.submit(
        "INSERT INTO calls (id, stream_sid, user_id, caller, source, node_id, slot, theme, status, started_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'live', ?)"
        " ON CONFLICT(id) DO UPDATE SET stream_sid = excluded.stream_sid,"
        " user_id = COALESCE(calls.user_id, excluded.user_id), caller = COALESCE(calls.caller, excluded.caller),"
        " source = excluded.source, node_id = excluded.node_id, slot = excluded.slot,"
        " theme = COALESCE(calls.theme, excluded.theme), status = 'live', ended_at = NULL, end_reason = NULL",
        (call_id, stream_sid, user_id, caller, source, node_id, slot, theme, int(started_at * 1000)),
    )


def record_end(
    db: Database,
    *,
    call_id: str,
    reason: str,
    duration_s: float,
    bal_p50_ms: float | None,
    bal_p99_ms: float | None,
    step_p50_ms: float | None,
    playout_lag_p50_ms: float | None,
    late_frames: int,
    ended_at: float | None = None,
) -> Any:
    return db.submit(
        "UPDATE calls SET status = 'ended', ended_at = ?, end_reason = ?, duration_s = ?, bal_p50_ms = ?,"
        " bal_p99_ms = ?, step_p50_ms = ?, playout_lag_p50_ms = ?, late_frames = ? WHERE id = ?",
        (
            int((ended_at or time.time()) * 1000),
            reason,
            duration_s,
            bal_p50_ms,
            bal_p99_ms,
            step_p50_ms,
            playout_lag_p50_ms,
            late_frames,
            call_id,
        ),
    )


COLUMNS = (
    "id",
    "stream_sid",
    "user_id",
    "caller",
    "source",
    "node_id",
    "slot",
    "theme",
    "status",
    "started_at",
    "ended_at",
    "end_reason",
    "duration_s",
    "bal_p50_ms",
    "bal_p99_ms",
    "step_p50_ms",
    "playout_lag_p50_ms",
    "late_frames",
    "legs",
)
"""Every column of ``calls``, in the order ``get`` and ``recent`` return them."""


def get(db: Database, call_id: str) -> dict[str, Any] | None:
    """One call row as a dict (tests, ``xswarm calls show``, the console's history)."""
    rows = db.query(f"SELECT {', '.join(COLUMNS)} FROM calls WHERE id = ?", (call_id,))
    return dict(zip(COLUMNS, rows[0], strict=True)) if rows else None


def recent(
    db: Database, *, since_ms: int | None = None, user_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Calls newest first (by ``started_at``), optionally since a time and for one user."""
    where: list[str] = []
    params: list[object] = []
    if since_ms is not None:
        where.append("started_at >= ?")
        params.append(int(since_ms))
    if user_id is not None:
        where.append("user_id = ?")
        params.append(user_id)
    sql = f"SELECT {', '.join(COLUMNS)} FROM calls"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
    return [dict(zip(COLUMNS, r, strict=True)) for r in db.query(sql, (*params, int(limit)))]
