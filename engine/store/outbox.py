"""The durable outbox: every notification is a row first, then a send, then a commit.

Why: a send is an effect outside the database. The row is committed before anything is sent
(in the same transaction as whatever caused it: a voicemail, an invoice event, a usage
count), so nothing is lost when the process dies; its id names what it is about, so asking
twice stores it once. Claiming works like the webhook inbox (``UPDATE … RETURNING`` with a
lease), and a row whose lease ran out while it was ``sending`` comes back ``in_doubt``: the
provider may have taken it before the process died, and ``engine.notify.sender`` asks the
provider before it sends again.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any, Literal

from engine.store.db import Database, Statement
from engine.store.inbox import backoff_ms

Channel = Literal["sms", "email"]

KINDS = ("welcome", "voicemail", "quota", "payment_failed", "billing")
"""What a user can turn off, one by one (``xswarm notify off USER KIND``)."""

_COLUMNS = (
    "id, kind, channel, user_id, from_addr, to_addr, subject, body, html, status, attempts,"
    " next_attempt_at, first_attempt_at, attempt_at, doubt_at, in_doubt, provider_id, last_error, created_at, sent_at"
)


@dataclass(frozen=True)
class OutboxRow:
    id: str
    kind: str
    channel: str
    user_id: str | None
    from_addr: str | None
    to_addr: str
    subject: str | None
    body: str
    html: str | None
    status: str
    attempts: int
    next_attempt_at: int | None
    first_attempt_at: int | None
    attempt_at: int | None
    doubt_at: int | None
    in_doubt: bool
    provider_id: str | None
    last_error: str | None
    created_at: int
    sent_at: int | None


@dataclass(frozen=True)
class Draft:
    """A message to enqueue (``enqueue_statement``)."""

    id: str
    kind: str
    channel: Channel
    user_id: str | None
    to_addr: str
    body: str
    from_addr: str | None = None
    subject: str | None = None
    html: str | None = None


def now_ms() -> int:
    return int(time.time() * 1000)


def _row(values: tuple[Any, ...]) -> OutboxRow:
    items = list(values)
    items[15] = bool(items[15])
    return OutboxRow(*items)


def enqueue_statement(
    draft: Draft, *, when: Statement | None = None, not_before_ms: int | None = None, revise: bool = False
) -> Statement:
    """The insert of one message; nothing when a row with its id exists. ``when``: a SQL
    condition (with its parameters) checked inside the same transaction, e.g. "usage has
    reached 80 %", so a threshold is judged on committed counts, not on a stale read.
    ``not_before_ms``: hold it back until then. ``revise``: a row with its id that has not
    been attempted yet takes this draft's text instead and is due at once (a voicemail's
    transcript arriving while its notice waits for it)."""
    if draft.kind not in KINDS:
        raise ValueError(f"unknown notification kind {draft.kind!r}")
    condition, params = when if when is not None else ("1", ())
    conflict = (
        "DO UPDATE SET subject = excluded.subject, body = excluded.body, html = excluded.html,"
        " next_attempt_at = excluded.next_attempt_at WHERE outbox.status = 'pending'"
        if revise
        else "DO NOTHING"
    )
    return (
        "INSERT INTO outbox (id, kind, channel, user_id, from_addr, to_addr, subject, body, html, created_at,"
        f" next_attempt_at) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE {condition} ON CONFLICT(id) {conflict}",
        (
            draft.id,
            draft.kind,
            draft.channel,
            draft.user_id,
            draft.from_addr,
            draft.to_addr,
            draft.subject,
            draft.body,
            draft.html,
            now_ms(),
            not_before_ms,
            *params,
        ),
    )


def claim_due(
    db: Database, *, limit: int, lease_ms: int, ids: list[str] | None = None, now: int | None = None
) -> concurrent.futures.Future[list[OutboxRow]]:
    """Take up to ``limit`` due rows (``ids``: only those). A row found ``sending`` has
    outlived its lease: it comes back with ``in_doubt`` set and ``doubt_at`` at the start of
    that attempt (every right-hand side below reads the row as it was)."""
    moment = now if now is not None else now_ms()
    only, only_params = ("", ()) if ids is None else (f" AND id IN ({','.join('?' * len(ids))})", tuple(ids))
    future = db.submit(
        "UPDATE outbox SET"
        " in_doubt = CASE WHEN status = 'sending' THEN 1 ELSE in_doubt END,"
        " doubt_at = CASE WHEN status = 'sending' THEN attempt_at ELSE doubt_at END,"
        " status = 'sending', attempts = attempts + 1, attempt_at = ?,"
        " first_attempt_at = COALESCE(first_attempt_at, ?), next_attempt_at = ?"
        " WHERE id IN (SELECT id FROM outbox WHERE status IN ('pending', 'failed', 'sending')"
        f" AND COALESCE(next_attempt_at, 0) <= ?{only} ORDER BY created_at LIMIT ?)"
        f" RETURNING {_COLUMNS}",
        (moment, moment, moment + lease_ms, moment, *only_params, limit),
        returning=True,
    )
    out: concurrent.futures.Future[list[OutboxRow]] = concurrent.futures.Future()

    def convert(done: concurrent.futures.Future[Any]) -> None:
        exc = done.exception()
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(sorted((_row(r) for r in done.result()), key=lambda r: r.created_at))

    future.add_done_callback(convert)
    return out


def sent_statements(outbox_id: str, provider_id: str | None, *, note: str | None = None) -> list[Statement]:
    """Mark a row sent (from ``sending``, ``failed`` or ``pending``) and record it in
    ``messages`` as an outgoing message; both are no-ops for a row already sent."""
    at = now_ms()
    message_id = provider_id or f"outbox:{outbox_id}"
    return [
        (
            "INSERT INTO messages (id, user_id, channel, direction, provider_id, from_addr, to_addr, subject, body,"
            " status, meta, created_at, updated_at)"
            " SELECT lower(hex(randomblob(16))), user_id, channel, 'out', ?, from_addr, to_addr, subject, body,"
            " 'sent', json_object('outbox', id, 'kind', kind), ?, ?"
            " FROM outbox WHERE id = ? AND status NOT IN ('sent', 'suppressed', 'dead')"
            " ON CONFLICT(provider_id) DO NOTHING",
            (message_id, at, at, outbox_id),
        ),
        (
            "UPDATE outbox SET status = 'sent', provider_id = COALESCE(?, provider_id), sent_at = ?, in_doubt = 0,"
            " next_attempt_at = NULL, last_error = ? WHERE id = ? AND status NOT IN ('sent', 'suppressed', 'dead')",
            (provider_id, at, note, outbox_id),
        ),
    ]


def failed_statement(
    row: OutboxRow, error: str, *, in_doubt: bool, max_attempts: int, retry_at: int | None = None
) -> tuple[bool, Statement]:
    """Record a failed attempt (``dead`` after ``max_attempts``). ``in_doubt``: the provider
    may have taken it (a timeout), so the next attempt checks first; a dead row keeps the
    flag, for the operator. Returns (dead, statement)."""
    dead = row.attempts >= max_attempts
    status = "dead" if dead else "failed"
    next_at = None if dead else retry_at if retry_at is not None else now_ms() + backoff_ms(row.attempts)
    return dead, (
        "UPDATE outbox SET status = ?, next_attempt_at = ?, last_error = ?, in_doubt = ?,"
        " doubt_at = CASE WHEN ? THEN COALESCE(doubt_at, attempt_at) ELSE NULL END WHERE id = ? AND status = 'sending'",
        (status, next_at, error[:2000], int(in_doubt), int(in_doubt), row.id),
    )


def wait_statement(row: OutboxRow, until_ms: int, reason: str) -> Statement:
    """Put a row in doubt back until ``until_ms`` without counting an attempt."""
    return (
        "UPDATE outbox SET status = 'failed', attempts = attempts - 1, next_attempt_at = ?, last_error = ?"
        " WHERE id = ? AND status = 'sending'",
        (until_ms, reason, row.id),
    )


def suppressed_statement(outbox_id: str, reason: str) -> Statement:
    """Never send this row (the user opted out); kept for the record."""
    return (
        "UPDATE outbox SET status = 'suppressed', next_attempt_at = NULL, in_doubt = 0, last_error = ?"
        " WHERE id = ? AND status != 'sent'",
        (reason, outbox_id),
    )


def retry(db: Database, outbox_id: str | None = None) -> int:
    """Queue dead rows again from scratch (one, or all with ``None``): after fixing what killed
    them. A row in doubt keeps its flag, so it is still checked with the provider first."""
    where, params = ("id = ? AND ", (outbox_id,)) if outbox_id is not None else ("", ())
    count = db.write(
        f"UPDATE outbox SET status = 'failed', attempts = 0, next_attempt_at = NULL WHERE {where}status = 'dead'",
        params,
    )
    return int(count or 0)


def provider_id_taken(db: Database, provider_id: str) -> bool:
    return bool(db.query("SELECT 1 FROM outbox WHERE provider_id = ? LIMIT 1", (provider_id,)))


def get(db: Database, outbox_id: str) -> OutboxRow | None:
    rows = db.query(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (outbox_id,))
    return _row(rows[0]) if rows else None


def list_rows(
    db: Database, *, status: str | None = None, user_id: str | None = None, limit: int = 50
) -> list[OutboxRow]:
    """Newest first."""
    where, params = [], []
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if user_id is not None:
        where.append("user_id = ?")
        params.append(user_id)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = db.query(f"SELECT {_COLUMNS} FROM outbox{clause} ORDER BY created_at DESC LIMIT ?", (*params, limit))
    return [_row(r) for r in rows]


def counts(db: Database) -> dict[str, int]:
    return {status: n for status, n in db.query("SELECT status, COUNT(*) FROM outbox GROUP BY status")}


def describe(row: OutboxRow) -> str:
    """One line for logs and the CLI (no addresses)."""
    extra = f" ({row.last_error})" if row.last_error and row.status != "sent" else ""
    return f"{row.id} {row.channel} {row.status}{extra}"
