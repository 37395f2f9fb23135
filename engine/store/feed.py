"""The ``events`` table: the feed of what happened (calls, messages, payments, supervisor
actions) that the TUI shows and that survives restarts.

High-rate samples (latency, ticks, system load, transcript tokens) are not feed items: they
go to metrics and live panels only. ``recorder(db)`` is a bus subscriber that appends every
other event without waiting, so publishing from the 80 ms tick never touches the database.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

from engine.events import Event, ModelStatusChanged
from engine.logging_setup import mask_phone
from engine.store.db import Database

SAMPLE_TYPES = frozenset({"LatencySampled", "TickSampled", "SystemSampled", "TranscriptAppended"})
"""Event types too frequent or too fine-grained to keep in the feed."""

PHONE_FIELDS = ("caller", "phone")
"""Wire fields that hold a phone number: masked in the feed and for read-only supervisors."""

_INSERT = "INSERT INTO events (at, type, call_id, user_id, summary, payload) VALUES (?, ?, ?, ?, ?, ?)"
_SUMMARY_MAX = 500


@dataclass(frozen=True)
class FeedEntry:
    id: int
    at: int
    """Unix milliseconds."""
    type: str
    call_id: str | None
    user_id: str | None
    summary: str | None
    payload: dict[str, Any] | None


def append(
    db: Database,
    *,
    type: str,
    summary: str,
    call_id: str | None = None,
    user_id: str | None = None,
    payload: dict[str, Any] | None = None,
    at_ms: int | None = None,
) -> concurrent.futures.Future[Any]:
    """Queue one feed row; the future resolves once it is committed."""
    return db.submit(
        _INSERT,
        (
            at_ms if at_ms is not None else int(time.time() * 1000),
            type,
            call_id,
            user_id,
            summary[:_SUMMARY_MAX],
            json.dumps(payload, separators=(",", ":"), default=str) if payload is not None else None,
        ),
    )


def summarize(event: Event) -> str:
    """One human line for an event; callers' numbers are masked."""
    fields = dataclasses.asdict(event)
    if isinstance(fields.get("summary"), str):
        return fields["summary"]
    parts = []
    for name, value in fields.items():
        if name == "at" or value is None or value == "" or isinstance(value, (list, dict)):
            continue
        if name in PHONE_FIELDS:
            value = mask_phone(str(value))
        parts.append(f"{name}={value}")
    return " ".join(parts)


def masked_wire(wire: dict[str, Any]) -> dict[str, Any]:
    """``wire`` with every phone field masked (a copy; the input is left as it is). The feed
    keeps only masked numbers, and read-only supervisors never see a full one: a number
    someone could dial back is for operators, who see it live."""
    if not any(wire.get(name) for name in PHONE_FIELDS):
        return wire
    return wire | {name: mask_phone(str(wire[name])) for name in PHONE_FIELDS if wire.get(name)}


def append_event(db: Database, event: Event) -> concurrent.futures.Future[Any]:
    """Queue a bus event as a feed row (type = its class name, payload = its masked wire form)."""
    wire = masked_wire(event.to_wire())
    at = wire.get("at")
    return append(
        db,
        type=type(event).__name__,
        summary=summarize(event),
        call_id=wire.get("call_id"),
        user_id=wire.get("user_id"),
        payload=wire,
        at_ms=int(at * 1000) if isinstance(at, (int, float)) else None,
    )


def event_statement(event: Event) -> tuple[str, tuple[Any, ...]]:
    """The feed row of a bus event as a statement, for callers that must commit it together
    with other writes (the webhook processor: the row lands exactly once, with its effects)."""
    wire = masked_wire(event.to_wire())
    at = wire.get("at")
    return (
        _INSERT,
        (
            int(at * 1000) if isinstance(at, (int, float)) else int(time.time() * 1000),
            type(event).__name__,
            wire.get("call_id"),
            wire.get("user_id"),
            summarize(event)[:_SUMMARY_MAX],
            json.dumps(wire, separators=(",", ":"), default=str),
        ),
    )


def keeps(event: Event) -> bool:
    """Whether a bus event belongs in the feed: not samples, nor a model load's progress
    (one event per loaded tensor group); the load's outcome (ready, failed, fallback) does."""
    if type(event).__name__ in SAMPLE_TYPES:
        return False
    return not (isinstance(event, ModelStatusChanged) and event.state in ("loading", "warming"))


def recent(
    db: Database, limit: int = 100, *, type: str | None = None, call_id: str | None = None, before_id: int | None = None
) -> list[FeedEntry]:
    """Newest first; ``before_id`` pages further back."""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("type", type), ("call_id", call_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if before_id is not None:
        clauses.append("id < ?")
        params.append(before_id)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = db.query(
        f"SELECT id, at, type, call_id, user_id, summary, payload FROM events{where} ORDER BY id DESC LIMIT ?",
        (*params, max(1, min(int(limit), 10_000))),
    )
    return [
        FeedEntry(id_, at, kind, call, user, summary, json.loads(payload) if payload else None)
        for id_, at, kind, call, user, summary, payload in rows
    ]


def prune(db: Database, older_than_ms: int) -> int:
    """Delete feed rows older than the cut-off; returns how many went."""
    return int(db.write("DELETE FROM events WHERE at < ?", (older_than_ms,)))
