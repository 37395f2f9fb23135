"""Records as the operator reads them: one JSON shape and one text layout for each kind,
shared by the ``xswarm calls|messages|audit`` commands and the console's History, Inbox and
Audit screens (so the two never disagree). Callers' numbers are masked unless revealed."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def iso(ms: int | float | None) -> str | None:
    """Unix milliseconds as ISO 8601 UTC (``2026-12-04T18:20:01Z``), None stays None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def table_time(value: str | None) -> str:
    """An ``iso`` time as a table cell: ``2026-12-04 18:20:01``, "—" for none."""
    return value.replace("T", " ").rstrip("Z") if value else "—"


def _caller(number: str | None, reveal: bool) -> str | None:
    from engine.logging_setup import mask_phone

    return number if reveal or number is None else mask_phone(number)


def call_record(row: dict[str, Any], reveal: bool) -> dict[str, Any]:
    """One ``calls`` row as the JSON the records commands print (times ISO 8601 UTC)."""
    return {
        "call_sid": row["id"],
        "caller": _caller(row["caller"], reveal),
        "user_id": row["user_id"],
        "node_id": row["node_id"],
        "source": row["source"],
        "theme": row["theme"],
        "status": row["status"],
        "started_at": iso(row["started_at"]),
        "ended_at": iso(row["ended_at"]),
        "duration_s": row["duration_s"],
        "end_reason": row["end_reason"],
        "bal_p50_ms": row["bal_p50_ms"],
        "bal_p99_ms": row["bal_p99_ms"],
        "step_p50_ms": row["step_p50_ms"],
        "playout_lag_p50_ms": row["playout_lag_p50_ms"],
        "late_frames": row["late_frames"],
        "legs": row["legs"],
    }


def clock_duration(seconds: float | None) -> str:
    """``m:ss``, or a dash when unknown (a call still live)."""
    if seconds is None:
        return "—"
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def call_details(db: Any, open_store: Callable[[], Any], call_sid: str, reveal: bool) -> dict[str, Any] | None:
    """A call with who acted on it (audit log) and its recording and transcript, if stored.
    ``open_store`` gives the object store (or None); one that cannot be opened or read is
    reported in ``storage_error`` and never hides the call itself."""
    from engine.storage import StorageError
    from engine.storage.recordings import find_recording
    from engine.store import audit, calls

    row = calls.get(db, call_sid)
    if row is None:
        return None
    actions = [
        {"at": iso(a.at), "actor": a.actor, "role": a.role, "action": a.action, "result": a.result}
        for a in reversed(audit.recent(db, call_id=call_sid, limit=1000))
    ]
    recording: dict[str, Any] | None = None
    transcript: list[dict[str, Any]] | None = None
    storage_error = None
    try:
        store = open_store()
        found = find_recording(store, call_sid) if store is not None else None
        if found is not None:
            recording = {"key": found.key, "size_bytes": found.size_bytes, "day": found.day}
            if found.transcript_key:
                transcript = json.loads(store.get_bytes(found.transcript_key)).get("transcript")
    except (StorageError, ValueError) as exc:
        storage_error = str(exc)
    return call_record(row, reveal) | {
        "slot": row["slot"],
        "listened": _actors(actions, "listen"),
        "took_over": _actors(actions, "takeover"),
        "actions": actions,
        "recording": recording,
        "transcript": transcript,
        **({"storage_error": storage_error} if storage_error else {}),
    }


def _actors(actions: list[dict[str, Any]], action: str) -> list[str]:
    """Who did ``action`` successfully, each once, sorted."""
    return sorted({str(a["actor"]) for a in actions if a["action"] == action and a["result"] == "ok"})


def describe_call(d: dict[str, Any]) -> list[str]:
    """Human lines for ``calls show`` and the console's history detail."""

    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.0f} ms"

    lines = [
        f"call        {d['call_sid']} ({d['source']}, {d['status']})",
        f"caller      {d['caller'] or '—'}   user {d['user_id'] or '—'}   theme {d['theme'] or '—'}",
        f"node        {d['node_id'] or '—'}   slot {d['slot'] if d['slot'] is not None else '—'}",
        f"started     {d['started_at'] or '—'}",
        f"ended       {d['ended_at'] or '—'}   after {clock_duration(d['duration_s'])}   ({d['end_reason'] or '—'})",
        f"latency     BAL p50 {ms(d['bal_p50_ms'])}  p99 {ms(d['bal_p99_ms'])}   step p50 {ms(d['step_p50_ms'])}",
        f"playout lag p50 {ms(d['playout_lag_p50_ms'])}   late frames {d['late_frames']}",
        f"listened    {', '.join(d['listened']) or 'nobody'}",
        f"took over   {', '.join(d['took_over']) or 'nobody'}",
    ]
    if d.get("recording"):
        rec = d["recording"]
        lines.append(
            f"recording   {rec['key']} ({rec['size_bytes'] / 1e6:.1f} MB): xswarm recordings get {d['call_sid']}"
        )
    elif d.get("storage_error"):
        lines.append(f"recording   unknown: {d['storage_error']}")
    else:
        lines.append("recording   none")
    if d["actions"]:
        lines.append("actions")
        lines += [
            f"  {a['at']}  {a['actor']} ({a['role'] or '—'}): {a['action']} → {a['result']}" for a in d["actions"]
        ]
    if d.get("transcript"):
        lines.append("transcript")
        lines += [f"  {t.get('at', 0):7.1f} s  {t.get('speaker', '?')}: {t.get('text', '')}" for t in d["transcript"]]
    return lines


def message_record(m: Any, reveal: bool = True) -> dict[str, Any]:
    """One ``messages`` row as JSON; a voicemail's audio is fetched with ``messages audio ID``."""
    from engine.logging_setup import mask_email

    def addr(value: str | None) -> str | None:
        if reveal or value is None:
            return value
        return mask_email(value) if "@" in value else _caller(value, False)

    return {
        "id": m.id,
        "kind": m.channel,
        "direction": m.direction,
        "user_id": m.user_id,
        "from": addr(m.from_addr),
        "to": addr(m.to_addr),
        "subject": m.subject,
        "body": m.body,
        "status": m.status,
        "provider_id": m.provider_id,
        "created_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
        "meta": m.meta,
    }


def audit_record(e: Any) -> dict[str, Any]:
    """One ``audit`` entry (``engine.store.audit``) as JSON."""
    return {
        "id": e.id,
        "at": iso(e.at),
        "actor": e.actor,
        "role": e.role,
        "action": e.action,
        "call_sid": e.call_id,
        "result": e.result,
        "detail": e.detail,
    }
