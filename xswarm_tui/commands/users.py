"""``xswarm users add|list|show|set-tier|set-theme|consent`` and ``xswarm users key create|revoke``."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, EXIT_FAILED, database, fail, load

if TYPE_CHECKING:
    from engine.config import Settings
    from engine.store.db import Database
    from engine.store.users import User

app = typer.Typer(help="Users, their tiers and API keys.", no_args_is_help=True)
keys = typer.Typer(help="API keys for the identity API (shown once, stored hashed).", no_args_is_help=True)
app.add_typer(keys, name="key")


def _when(ms: int | None) -> str:
    if ms is None:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def _find(db: Database, ref: str) -> User:
    from engine.store.users import lookup

    user = lookup(db, ref)
    if user is None:
        fail(f"no user {ref!r} (give an id, an E.164 phone or an email)", EXIT_FAILED)
    return user


@app.command()
def add(
    name: str = typer.Option(..., "--name", help="Display name."),
    phone: str = typer.Option(..., "--phone", help="E.164, e.g. +14155550123."),
    email: str = typer.Option(..., "--email"),
    tier: str = typer.Option("free", "--tier", help="free, personal, professional, enterprise or admin."),
    welcome: bool = typer.Option(False, "--welcome", help="Text and email the user a welcome (through the outbox)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a user."""
    from engine.store.users import create_user

    settings = load()
    with database(settings) as db:
        try:
            user = create_user(db, name=name, phone=phone, email=email, tier=tier)
        except ValueError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        if welcome:
            _welcome(settings, db, user)
    typer.echo(
        json.dumps(dataclasses.asdict(user)) if as_json else f"created user {user.id} ({user.name}, {user.tier})"
    )


def _welcome(settings: Settings, db: Database, user: User) -> None:
    """Queue the welcome and try it at once; what did not go out is retried by the webhooks
    server (or ``xswarm notify drain``)."""
    import asyncio

    from engine.notify import compose
    from engine.notify.sender import send_now

    drafts = compose.welcome(settings, user)
    if not drafts:
        typer.echo("welcome: not sent (neither Twilio nor SendGrid sending is configured)", err=True)
    for row in asyncio.run(send_now(settings, db, drafts)):
        note = f" ({row.last_error})" if row.last_error and row.status != "sent" else ""
        typer.echo(f"welcome {row.channel}: {row.status}{note}", err=True)


@app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="A JSON array with full phones and emails."),
    reveal: bool = typer.Option(False, "--reveal", help="Show full phones and emails in the table."),
) -> None:
    """List users (phones and emails masked unless --reveal)."""
    from engine.logging_setup import mask_email, mask_phone
    from engine.store.users import list_users

    with database() as db:
        found = list_users(db)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(u) for u in found]))
        return
    if not found:
        typer.echo("no users yet (add one: xswarm users add --name … --phone … --email …)")
        return
    rows = [("ID", "NAME", "PHONE", "EMAIL", "TIER", "CREATED")]
    for u in found:
        phone = u.phone if reveal else mask_phone(u.phone)
        email = u.email if reveal else mask_email(u.email)
        rows.append((u.id, u.name, phone or "—", email or "—", u.tier, _when(u.created_at)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@app.command()
def show(
    user: str = typer.Argument(..., help="Id, phone or email."), as_json: bool = typer.Option(False, "--json")
) -> None:
    """One user with their API keys (prefixes only)."""
    from engine.store.users import list_api_keys

    with database() as db:
        found = _find(db, user)
        api_keys = list_api_keys(db, found.id)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(found) | {"api_keys": [dataclasses.asdict(k) for k in api_keys]}))
        return
    for field in dataclasses.fields(found):
        value = getattr(found, field.name)
        typer.echo(f"{field.name:>19}: {_when(value) if field.name.endswith('_at') else value}")
    typer.echo(f"{'api_keys':>19}: {len(api_keys)}")
    for k in api_keys:
        state = f"revoked {_when(k.revoked_at)}" if k.revoked_at else f"last used {_when(k.last_used_at)}"
        typer.echo(f"{'':>21}{k.id}  {k.prefix}…  created {_when(k.created_at)}  {state}")


@app.command("set-tier")
def set_tier(user: str = typer.Argument(..., help="Id, phone or email."), tier: str = typer.Argument(...)) -> None:
    """Change a user's tier."""
    from engine.store import users

    with database() as db:
        found = _find(db, user)
        try:
            users.set_tier(db, found.id, tier)
        except ValueError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
    typer.echo(f"{found.id}: tier {found.tier} -> {tier}")


@app.command("set-theme")
def set_theme(
    user: str = typer.Argument(..., help="Id, phone or email."),
    theme: str = typer.Argument(..., help="Theme name (xswarm, hal-9000, kitt, glados or your own file)."),
) -> None:
    """Choose the persona (greeting, voice, reply tone) of a user's calls and messages."""
    from engine.store import users

    with database() as db:
        found = _find(db, user)
        try:
            users.set_theme(db, found.id, theme)
        except ValueError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
    typer.echo(f"{found.id}: theme {found.theme} -> {theme}")


@app.command("consent")
def consent(
    user: str = typer.Argument(..., help="Id, phone or email."),
    recording: bool = typer.Option(
        ..., "--recording/--no-recording", help="The user agreed to call recording (or withdrew)."
    ),
) -> None:
    """Record whether a user consented to call recording (recordings also need recording.enabled)."""
    from engine.store import users

    with database() as db:
        found = _find(db, user)
        users.set_recording_consent(db, found.id, recording)
    typer.echo(f"{found.id}: recording consent {'on' if recording else 'off'}")


@keys.command("create")
def key_create(user: str = typer.Argument(..., help="Id, phone or email.")) -> None:
    """Create an API key and print it ONCE (only its hash is kept)."""
    from engine.store.users import create_api_key

    with database() as db:
        found = _find(db, user)
        key_id, key = create_api_key(db, found.id)
    typer.echo(key)
    typer.echo(f"key id {key_id} for {found.id}; this key is not shown again", err=True)


@keys.command("revoke")
def key_revoke(key_id: str = typer.Argument(..., help="Key id or its visible prefix (xsk_…).")) -> None:
    """Revoke an API key at once."""
    from engine.store.users import revoke_api_key

    with database() as db:
        revoked = revoke_api_key(db, key_id)
    if not revoked:
        fail(f"no live API key matches {key_id!r}", EXIT_FAILED)
    typer.echo(f"revoked {key_id}")
