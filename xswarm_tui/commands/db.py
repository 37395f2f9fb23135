"""``xswarm db migrate|status``: apply and inspect the schema."""

from __future__ import annotations

import json

import typer

from xswarm_tui.commands._common import fail, load

app = typer.Typer(help="Database schema: apply migrations, show status.", no_args_is_help=True)


@app.command()
def migrate() -> None:
    """Apply pending migrations (safe to repeat; the runtime also does this at start)."""
    from engine.store import migrations
    from engine.store.db import Database, StoreError

    settings = load()
    try:
        with Database.from_settings(settings) as db:
            applied = migrations.migrate(db)
            version = migrations.version(db)
            where = db.target.describe()
    except StoreError as exc:
        fail(str(exc))
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "nothing to apply"
    typer.echo(f"{where}: {names}; schema version {version}")


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help='Print {"version": N, "pending": [...], "tables": [...]}.'),
) -> None:
    """Show the schema version, pending migrations and tables (applies nothing)."""
    from engine.store import migrations
    from engine.store.db import Database, StoreError

    settings = load()
    try:
        with Database.from_settings(settings) as db:
            done = migrations.applied(db)
            version = migrations.version(db)
            tables = migrations.tables(db)
            pending = [f"{m.version:04d}_{m.name}" for m in migrations.available() if m.version not in done]
            where = db.target.describe()
    except StoreError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"version": version, "pending": pending, "tables": tables}))
        return
    typer.echo(f"database: {where}")
    typer.echo(f"schema version: {version}")
    typer.echo(f"pending: {', '.join(pending) or 'none'}")
    typer.echo(f"tables ({len(tables)}): {', '.join(tables)}")
