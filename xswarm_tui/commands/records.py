"""What an operator looks back at: ``xswarm calls``, ``messages``, ``audit`` and ``recordings``.

Read-only views of what the runtime and the webhooks already write (``calls``, ``messages``,
``audit_log`` and the object store's ``recordings/``). Every ``list`` prints a table, or with
``--json`` a JSON list, newest first and ``[]`` when there is nothing, so scripts never have
to special-case an empty database. Callers' numbers are masked unless ``--reveal`` (in JSON
too: the output ends up in terminals, tickets and chat logs).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, EXIT_FAILED, database, fail, load
from xswarm_tui.records import (
    audit_record,
    call_details,
    call_record,
    clock_duration,
    describe_call,
    iso,
    message_record,
    table_time,
)

calls_app = typer.Typer(help="Calls this node (and its fleet) answered: list and show.", no_args_is_help=True)
messages_app = typer.Typer(help="SMS, email and voicemail, both directions.", no_args_is_help=True)
audit_app = typer.Typer(help="Every supervisor action and failed supervisor login.", no_args_is_help=True)
recordings_app = typer.Typer(help="Call recordings in the object store: list and download.", no_args_is_help=True)

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SINCE_HELP = (
    "Only newer records: an age (90s, 30m, 2h, 7d, 1w) or an ISO date/time "
    "(2026-12-01, 2026-12-01T08:00; UTC unless it has an offset)."
)
LIMIT_OPTION = typer.Option(100, "--limit", min=1, max=100_000, help="At most this many rows.")
VOICEMAIL_TIMEOUT_S = 60.0
"""A voicemail download, start to end (a few MB at most)."""


def parse_since(text: str, now: float | None = None) -> int:
    """``--since`` as unix milliseconds; a clear error for anything else."""
    text = text.strip()
    match = _AGO.match(text)
    if match:
        now = time.time() if now is None else now
        return int((now - float(match.group(1)) * _UNIT_S[match.group(2)]) * 1000)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither an age (30m, 2h, 7d) nor an ISO date", param_hint="--since"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _since(value: str | None) -> int | None:
    return parse_since(value) if value is not None else None


def _table(rows: list[tuple[Any, ...]]) -> None:
    """Left-aligned columns, the first row a header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# ------------------------------------------------------------------------------------ calls
@calls_app.command("list")
def calls_list(
    as_json: bool = typer.Option(False, "--json", help="A JSON list, newest first."),
    reveal: bool = typer.Option(False, "--reveal", help="Full caller numbers (masked otherwise)."),
    since: str | None = typer.Option(None, "--since", help=SINCE_HELP),
    user: str | None = typer.Option(None, "--user", help="Only this user's calls (id, phone or email)."),
    limit: int = LIMIT_OPTION,
) -> None:
    """Calls, newest first: times, caller, user, node, duration and why they ended."""
    from engine.store import calls
    from engine.store.users import lookup

    since_ms = _since(since)
    with database() as db:
        user_id = None
        if user is not None:
            found = lookup(db, user)
            user_id = found.id if found is not None else user  # an id of a deleted user still finds its calls
        rows = [call_record(r, reveal) for r in calls.recent(db, since_ms=since_ms, user_id=user_id, limit=limit)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no calls yet (place a test call: xswarm call --help)")
        return
    table: list[tuple[Any, ...]] = [("STARTED (UTC)", "CALL", "CALLER", "USER", "NODE", "DURATION", "ENDED BECAUSE")]
    for r in rows:
        table.append(
            (
                table_time(r["started_at"]),
                r["call_sid"],
                r["caller"] or "—",
                r["user_id"] or "—",
                r["node_id"] or "—",
                clock_duration(r["duration_s"]) if r["status"] == "ended" else r["status"],
                r["end_reason"] or "—",
            )
        )
    _table(table)


def _open_store() -> Any:
    """The configured object store, or exit 1 saying why it cannot be opened."""
    from engine.storage import StorageError, open_store

    try:
        return open_store(load())
    except StorageError as exc:
        fail(str(exc))


@calls_app.command("show")
def calls_show(
    call_sid: str = typer.Argument(..., help="The call's id (Twilio CallSid or local-…)."),
    as_json: bool = typer.Option(False, "--json"),
    reveal: bool = typer.Option(False, "--reveal", help="The full caller number."),
) -> None:
    """One call: times, duration, end reason, node, who listened or took over, latency, recording."""
    from engine.storage import open_store

    settings = load()
    with database(settings) as db:
        details = call_details(db, lambda: open_store(settings), call_sid, reveal)
    if details is None:
        fail(f"no call {call_sid!r} (list them: xswarm calls list)", EXIT_FAILED)
    if as_json:
        typer.echo(json.dumps(details))
        return
    for line in describe_call(details):
        typer.echo(line)


# ---------------------------------------------------------------------------------- messages
@messages_app.command("list")
def messages_list(
    as_json: bool = typer.Option(False, "--json", help="A JSON list, newest first."),
    kind: str | None = typer.Option(None, "--kind", help="sms, email or voicemail."),
    reveal: bool = typer.Option(False, "--reveal", help="Full numbers and addresses (masked otherwise)."),
    limit: int = LIMIT_OPTION,
) -> None:
    """SMS, email and voicemail messages, newest first."""
    from engine.store import messages

    if kind is not None and kind not in ("sms", "email", "voicemail"):
        fail(f"--kind must be sms, email or voicemail, not {kind!r}", EXIT_BAD_INPUT)
    with database() as db:
        rows = [message_record(m, reveal) for m in messages.recent(db, channel=kind, limit=limit)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no messages yet")
        return
    table: list[tuple[Any, ...]] = [("AT (UTC)", "KIND", "DIR", "FROM", "USER", "STATUS", "TEXT", "ID")]
    for r in rows:
        text = r["subject"] or r["body"] or ""
        if r["kind"] == "voicemail":
            text = f"{float(r['meta'].get('duration_s') or 0):.0f} s of audio"
        table.append(
            (
                table_time(r["created_at"]),
                r["kind"],
                r["direction"],
                r["from"] or "—",
                r["user_id"] or "—",
                r["status"] or "—",
                text.replace("\n", " ")[:60],
                r["id"],
            )
        )
    _table(table)


@messages_app.command("audio")
def messages_audio(
    message_id: str = typer.Argument(..., help="The voicemail's id (from messages list) or its RecordingSid."),
    to: Path = typer.Option(..., "--to", help="Where to write the WAV file."),
) -> None:
    """Download a voicemail's audio from Twilio (needs twilio.account_sid and TWILIO_AUTH_TOKEN)."""
    import asyncio

    from engine.files import write_atomically
    from engine.store import messages
    from engine.telephony.twilio_rest import TwilioError, open_client

    settings = load()
    with database(settings) as db:
        found = messages.get(db, message_id)
    if found is None or found.channel != "voicemail":
        fail(f"no voicemail {message_id!r} (list them: xswarm messages list --kind voicemail)")
    sid = found.provider_id or ""

    async def fetch() -> bytes:
        async with open_client(settings.twilio, timeout_s=VOICEMAIL_TIMEOUT_S) as twilio:
            return await twilio.recording(sid, "wav")

    try:
        audio = asyncio.run(fetch())
        write_atomically(to, audio)
    except TwilioError as exc:
        fail(f"voicemail {sid or message_id}: {exc}")
    except OSError as exc:
        fail(f"cannot write {to}: {exc}")
    typer.echo(f"wrote {to} ({len(audio)} bytes)")


# ------------------------------------------------------------------------------------- audit
@audit_app.command("list")
def audit_list(
    as_json: bool = typer.Option(False, "--json", help="A JSON list, newest first."),
    since: str | None = typer.Option(None, "--since", help=SINCE_HELP),
    call: str | None = typer.Option(None, "--call", help="Only actions on this call."),
    limit: int = LIMIT_OPTION,
) -> None:
    """Supervisor actions (listen, take over, hang up, …) and failed logins, newest first."""
    from engine.store import audit

    since_ms = _since(since)
    with database() as db:
        entries = audit.recent(db, since_ms=since_ms, call_id=call, limit=limit)
    rows = [audit_record(e) for e in entries]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no supervisor actions recorded")
        return
    table: list[tuple[Any, ...]] = [("AT (UTC)", "ACTOR", "ROLE", "ACTION", "CALL", "RESULT")]
    table += [
        (
            table_time(r["at"]),
            r["actor"],
            r["role"] or "—",
            r["action"],
            r["call_sid"] or "—",
            r["result"],
        )
        for r in rows
    ]
    _table(table)


# -------------------------------------------------------------------------------- recordings
@recordings_app.command("list")
def recordings_list(as_json: bool = typer.Option(False, "--json", help="A JSON list, newest first.")) -> None:
    """Uploaded call recordings (stereo WAV: caller left, AI or operator right)."""
    from engine.storage import StorageError
    from engine.storage.recordings import list_recordings

    store = _open_store()
    try:
        found = list_recordings(store)
    except StorageError as exc:
        fail(str(exc))
    rows: list[dict[str, Any]] = [
        {
            "call_sid": r.call_sid,
            "day": r.day,
            "key": r.key,
            "size_bytes": r.size_bytes,
            "uploaded_at": iso(r.uploaded_at * 1000),
            "transcript": r.transcript_key is not None,
        }
        for r in found
    ]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no recordings (they need recording.enabled and the user's consent: xswarm users consent)")
        return
    table: list[tuple[Any, ...]] = [("DAY", "CALL", "SIZE", "TRANSCRIPT")]
    table += [
        (r["day"], r["call_sid"], f"{r['size_bytes'] / 1e6:.1f} MB", "yes" if r["transcript"] else "no") for r in rows
    ]
    _table(table)


@recordings_app.command("get")
def recordings_get(
    call_sid: str = typer.Argument(..., help="The call's id."),
    to: Path = typer.Option(..., "--to", help="Where to write the WAV file."),
) -> None:
    """Download one call's recording (checked against its sha256 before it is written)."""
    from engine.storage import StorageError
    from engine.storage.recordings import find_recording

    store = _open_store()
    try:
        found = find_recording(store, call_sid)
        if found is None:
            fail(f"no recording of {call_sid!r} (list them: xswarm recordings list)")
        info = store.get_file(found.key, to)
    except StorageError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {to}: {exc}")
    typer.echo(f"wrote {to} ({info.size} bytes)")


def register(app: typer.Typer) -> None:
    app.add_typer(calls_app, name="calls")
    app.add_typer(messages_app, name="messages")
    app.add_typer(audit_app, name="audit")
    app.add_typer(recordings_app, name="recordings")
