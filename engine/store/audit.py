"""The ``audit_log`` table: every supervisor action and every failed supervisor login.

Rows are written through the database's single writer (group commit), so recording an action
costs the caller one queue put; ``record`` returns the write's future for callers that must
know the row is durable before they answer.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from engine.store.db import Database, log_if_failed

log = logging.getLogger("xswarm.store.audit")


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: int
    """Unix milliseconds."""
    actor: str
    role: str | None
    action: str
    call_id: str | None
    detail: dict[str, Any] | None
    result: str


def record(
    db: Database,
    *,
    actor: str,
    action: str,
    result: str,
    role: str | None = None,
    call_id: str | None = None,
    detail: dict[str, Any] | None = None,
    at: float | None = None,
) -> concurrent.futures.Future[Any]:
    """Queue one audit row; the future resolves once it is committed."""
    at_ms = int((at if at is not None else time.time()) * 1000)
    payload = json.dumps(detail, separators=(",", ":"), default=str) if detail else None
    return db.submit(
        "INSERT INTO audit_log (at, actor, role, action, call_id, detail, result) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (at_ms, actor, role, action, call_id, payload, result),
    )


log_failure = log_if_failed("audit_log row", log, logging.ERROR)
"""Done-callback for ``record`` futures nobody awaits: a lost audit row is an error in the log."""


def recent(
    db: Database,
    *,
    limit: int = 100,
    call_id: str | None = None,
    action: str | None = None,
    since_ms: int | None = None,
) -> list[AuditEntry]:
    """Newest first, optionally for one call, one action, or since a time (unix ms)."""
    where: list[str] = []
    params: list[object] = []
    if since_ms is not None:
        where.append("at >= ?")
        params.append(int(since_ms))
    if call_id is not None:
        where.append("call_id = ?")
        params.append(call_id)
    if action is not None:
        where.append("action = ?")
        params.append(action)
    sql = "SELECT id, at, actor, role, action, call_id, detail, result FROM audit_log"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    rows = db.query(sql, (*params, int(limit)))
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None, r[7]) for r in rows]
