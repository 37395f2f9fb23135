"""``xswarm notify list|drain|retry|off|on``: the outbox and who wants which notifications."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, EXIT_FAILED, database, fail, load

app = typer.Typer(help="Notifications: the outbox, sending it, and per-user opt-outs.", no_args_is_help=True)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "—"


@app.command("list")
def list_(
    status: str | None = typer.Option(None, "--status", help="pending, failed, sent, suppressed or dead."),
    user: str | None = typer.Option(None, "--user", help="Id, phone or email."),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000),
) -> None:
    """Messages in the outbox, newest first (no addresses or bodies)."""
    from engine.store import outbox
    from engine.store.users import lookup

    with database() as db:
        user_id = None
        if user is not None:
            found = lookup(db, user)
            if found is None:
                fail(f"no user {user!r}", EXIT_FAILED)
            user_id = found.id
        rows = outbox.list_rows(db, status=status, user_id=user_id, limit=limit)
        totals = outbox.counts(db)
    for row in rows:
        note = f"  {row.last_error}" if row.last_error else ""
        typer.echo(f"{_when(row.created_at)}  {row.status:<10} {row.channel:<5} {row.attempts}x  {row.id}{note}")
    typer.echo(", ".join(f"{n} {s}" for s, n in sorted(totals.items())) or "the outbox is empty", err=True)


@app.command()
def drain() -> None:
    """Send every message that is due now (the webhooks server does this by itself)."""
    from engine.notify.sender import open_sender
    from engine.store import outbox

    settings = load()

    async def run() -> None:
        async with open_sender(settings, db) as sender:
            await sender.drain()

    with database(settings) as db:
        asyncio.run(run())
        totals = outbox.counts(db)
    typer.echo(", ".join(f"{n} {s}" for s, n in sorted(totals.items())) or "the outbox is empty")


@app.command()
def retry(
    message: str | None = typer.Argument(None, help="An outbox id (see `notify list --status dead`)."),
    all_dead: bool = typer.Option(False, "--all", help="Every dead message."),
) -> None:
    """Queue dead messages again (after fixing what made them fail); the server sends them."""
    from engine.store import outbox

    if (message is None) == (not all_dead):
        fail("give one outbox id, or --all", EXIT_BAD_INPUT)
    with database() as db:
        count = outbox.retry(db, None if all_dead else message)
    if not count and message is not None:
        fail(f"no dead message {message!r}", EXIT_FAILED)
    typer.echo(f"queued {count} message{'s' if count != 1 else ''} again")


def _set(user: str, kind: str, enabled: bool) -> None:
    from engine.store import optouts
    from engine.store.outbox import KINDS
    from engine.store.users import lookup

    if kind not in KINDS:
        fail(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}", EXIT_BAD_INPUT)
    with database() as db:
        found = lookup(db, user)
        if found is None:
            fail(f"no user {user!r}", EXIT_FAILED)
        optouts.set_kind(db, found.id, kind, enabled)
        off = optouts.kinds_off(db, found.id)
    typer.echo(f"{found.id}: {kind} {'on' if enabled else 'off'} (off: {', '.join(off) or 'none'})")


@app.command()
def off(user: str = typer.Argument(..., help="Id, phone or email."), kind: str = typer.Argument(...)) -> None:
    """Stop one kind of notification for a user (welcome, voicemail, quota, payment_failed, billing)."""
    _set(user, kind, False)


@app.command()
def on(user: str = typer.Argument(..., help="Id, phone or email."), kind: str = typer.Argument(...)) -> None:
    """Send one kind of notification to a user again."""
    _set(user, kind, True)
