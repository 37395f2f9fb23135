"""The durable webhook inbox: one table that is dedupe key, work queue and dead-letter box.

Why one table: a provider's retry may land after a restart or on another node, so dedupe must
live in the database, and the same row then carries the work (``pending``/``failed`` with
``next_attempt_at``) and its failure history (``attempts``, ``last_error``, ``dead``).

Claiming is one ``UPDATE … RETURNING`` that bumps ``attempts`` and pushes ``next_attempt_at``
out by a lease: if the process dies mid-effect the row simply comes due again after the
lease, and two processors sharing one database never run the same row at the same time.
"""

from __future__ import annotations

import concurrent.futures
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from engine.store.db import Database

Status = Literal["pending", "done", "failed", "dead"]

_COLUMNS = "rowid, provider, event_id, event_type, received_at, payload, status, attempts, next_attempt_at, last_error"


@dataclass(frozen=True)
class InboxRow:
    rowid: int
    provider: str
    event_id: str
    event_type: str | None
    received_at: int
    payload: str
    status: str
    attempts: int
    next_attempt_at: int | None
    last_error: str | None

    @property
    def key(self) -> str:
        """The operator-facing id (``xswarm webhooks replay <key>``)."""
        return f"{self.provider}:{self.event_id}"


def now_ms() -> int:
    return int(time.time() * 1000)


def put_statement(
    provider: str, event_id: str, event_type: str | None, payload: str, *, not_before_ms: int | None = None
) -> tuple[str, tuple[Any, ...]]:
    """The insert of a verified event; its rowcount is 1 for a new row, 0 for a duplicate."""
    return (
        "INSERT INTO webhook_inbox (provider, event_id, event_type, received_at, payload, next_attempt_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(provider, event_id) DO NOTHING",
        (provider, event_id, event_type, now_ms(), payload, not_before_ms),
    )


def put(
    db: Database,
    provider: str,
    event_id: str,
    event_type: str | None,
    payload: str,
    *,
    not_before_ms: int | None = None,
) -> concurrent.futures.Future[Any]:
    """Store a verified event. The future resolves to 1 for a new row, 0 for a duplicate.

    ``not_before_ms`` holds the row back from the processor until then."""
    return db.submit(*put_statement(provider, event_id, event_type, payload, not_before_ms=not_before_ms))


def claim_due(db: Database, *, limit: int, lease_ms: int, now: int | None = None) -> concurrent.futures.Future[Any]:
    """Atomically take up to ``limit`` due rows (oldest first); resolves to ``list[InboxRow]``."""
    moment = now if now is not None else now_ms()
    future = db.submit(
        "UPDATE webhook_inbox SET attempts = attempts + 1, next_attempt_at = ?"
        " WHERE rowid IN (SELECT rowid FROM webhook_inbox WHERE status IN ('pending', 'failed')"
        " AND COALESCE(next_attempt_at, 0) <= ? ORDER BY received_at LIMIT ?)"
        f" RETURNING {_COLUMNS}",
        (moment + lease_ms, moment, limit),
        returning=True,
    )
    out: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def convert(done: concurrent.futures.Future[Any]) -> None:
        exc = done.exception()
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(sorted((InboxRow(*r) for r in done.result()), key=lambda r: r.received_at))

    future.add_done_callback(convert)
    return out


def release_statement(provider: str, event_id: str) -> tuple[str, tuple[Any, ...]]:
    """Make a held-back pending row due now."""
    return (
        "UPDATE webhook_inbox SET next_attempt_at = NULL WHERE provider = ? AND event_id = ? AND status = 'pending'",
        (provider, event_id),
    )


def backoff_ms(attempts: int, *, base_ms: int = 2000, cap_ms: int = 3_600_000) -> int:
    """Exponential backoff with full jitter: 2 s, 4 s, 8 s … capped at an hour."""
    ceiling = min(cap_ms, base_ms * (2 ** max(0, attempts - 1)))
    return int(ceiling / 2 + random.random() * ceiling / 2)


def mark_failed(
    db: Database, row: InboxRow, error: str, *, max_attempts: int, now: int | None = None
) -> tuple[bool, concurrent.futures.Future[Any]]:
    """Record a failed attempt: retry later, or ``dead`` once ``max_attempts`` is reached.
    Only by the attempt that holds the row: a row claimed again meanwhile (or done) is left
    alone. Returns (dead, write future)."""
    moment = now if now is not None else now_ms()
    dead = row.attempts >= max_attempts
    status, next_at = ("dead", None) if dead else ("failed", moment + backoff_ms(row.attempts))
    future = db.submit(
        "UPDATE webhook_inbox SET status = ?, next_attempt_at = ?, last_error = ?"
        " WHERE provider = ? AND event_id = ? AND attempts = ? AND status != 'done'",
        (status, next_at, error[:2000], row.provider, row.event_id, row.attempts),
    )
    return dead, future


def list_rows(db: Database, *, status: Status | None = None, limit: int = 100) -> list[InboxRow]:
    """Newest first; ``status`` filters (``dead`` is the dead-letter box)."""
    if status is None:
        rows = db.query(f"SELECT {_COLUMNS} FROM webhook_inbox ORDER BY received_at DESC LIMIT ?", (limit,))
    else:
        rows = db.query(
            f"SELECT {_COLUMNS} FROM webhook_inbox WHERE status = ? ORDER BY received_at DESC LIMIT ?",
            (status, limit),
        )
    return [InboxRow(*r) for r in rows]


def get(db: Database, key: str) -> InboxRow | None:
    """Look a row up by its ``provider:event_id`` key."""
    provider, sep, event_id = key.partition(":")
    if not sep or not event_id:
        return None
    rows = db.query(f"SELECT {_COLUMNS} FROM webhook_inbox WHERE provider = ? AND event_id = ?", (provider, event_id))
    return InboxRow(*rows[0]) if rows else None


def replay(db: Database, key: str) -> bool:
    """Queue a row again from scratch (dead, failed or done); False if there is no such row."""
    provider, sep, event_id = key.partition(":")
    if not sep or not event_id:
        return False
    count = db.write(
        "UPDATE webhook_inbox SET status = 'pending', attempts = 0, next_attempt_at = NULL, last_error = NULL"
        " WHERE provider = ? AND event_id = ?",
        (provider, event_id),
    )
    return bool(count)


def claim_one(db: Database, key: str, *, lease_ms: int, now: int | None = None) -> InboxRow | None:
    """Take one row by key whatever its status (an operator's replay), resetting its
    attempts; None if there is no such row."""
    provider, sep, event_id = key.partition(":")
    if not sep or not event_id:
        return None
    moment = now if now is not None else now_ms()
    rows = db.write(
        "UPDATE webhook_inbox SET status = 'pending', attempts = 1, next_attempt_at = ?, last_error = NULL"
        f" WHERE provider = ? AND event_id = ? RETURNING {_COLUMNS}",
        (moment + lease_ms, provider, event_id),
        returning=True,
    )
    return InboxRow(*rows[0]) if rows else None


def open_counts(db: Database) -> dict[str, int]:
    """Rows per status that is not ``done`` (the status index answers it without reading the
    done rows, however many there are): the backlog and the dead letters, for /metrics."""
    return {
        status: n
        for status, n in db.query(
            "SELECT status, COUNT(*) FROM webhook_inbox WHERE status IN ('pending', 'failed', 'dead') GROUP BY status"
        )
    }


def oldest_open_received_ms(db: Database) -> int | None:
    """When the oldest row still to be applied (pending or failed) was received; None if none."""
    rows = db.query("SELECT MIN(received_at) FROM webhook_inbox WHERE status IN ('pending', 'failed')")
    return rows[0][0] if rows and rows[0][0] is not None else None


def counts(db: Database) -> dict[str, int]:
    """Rows per status (the health page and the TUI show them)."""
    return {status: n for status, n in db.query("SELECT status, COUNT(*) FROM webhook_inbox GROUP BY status")}
