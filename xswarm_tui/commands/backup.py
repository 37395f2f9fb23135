"""``xswarm backup create|list|restore|prune``: database backups in the object store.

The store is the local folder ``<data>/storage`` unless ``XSWARM_S3_BUCKET`` (and friends)
point at S3/R2. ``restore latest`` with the bucket's variables set is how a lost machine is
rebuilt (README: "Backups and storage").
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, fail, load

if TYPE_CHECKING:
    from engine.config import Settings
    from engine.storage import ObjectStore

app = typer.Typer(
    help="Back up, list, restore and prune database backups (local folder or S3/R2).", no_args_is_help=True
)


def _store(settings: Settings) -> ObjectStore:
    from engine.storage import StorageError, open_store

    try:
        store = open_store(settings)
        store.check()
    except StorageError as exc:
        fail(str(exc))
    return store


@app.command()
def create(
    method: str = typer.Option("auto", help="auto | snapshot (embedded file) | dump (logical SQL dump)."),
) -> None:
    """Take a consistent backup now (safe while xswarm runs: it runs at a lower CPU and I/O
    priority than the calls); prints the new backup's id."""
    from engine.priority import run_in_background
    from engine.storage import StorageError
    from engine.storage.backup import BackupError, create_backup
    from engine.store.db import Database

    run_in_background()

    if method not in ("auto", "snapshot", "dump"):
        fail(f"unknown method {method!r} (auto, snapshot or dump)", EXIT_BAD_INPUT)
    settings = load()
    db = Database.from_settings(settings)
    if not db.target.remote and not Path(db.target.location).exists():
        fail(f"no database at {db.target.location} (nothing to back up yet)")
    store = _store(settings)
    try:
        store.check()  # an endpoint that does not answer fails here, after one read timeout
        backup = create_backup(db, store, method=method)  # type: ignore[arg-type]
    except (BackupError, StorageError) as exc:
        fail(str(exc))
    finally:
        db.close()
    typer.echo(backup.id)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="A JSON array instead of a table.")) -> None:
    """Backups in the store, newest first."""
    from engine.storage import StorageError
    from engine.storage.backup import list_backups

    store = _store(load())
    try:
        backups = list_backups(store)
    except StorageError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps([b.to_json() for b in backups], indent=2))
        return
    if not backups:
        typer.echo(f"no backups in {store.describe()}")
        return
    typer.echo(f"{'ID':<24} {'CREATED (UTC)':<20} {'SIZE':>10} {'FORMAT':<7} {'SCHEMA':>6} {'ROWS':>10}")
    for b in backups:
        created = datetime.fromtimestamp(b.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(
            f"{b.id:<24} {created:<20} {_size(b.size):>10} {b.format:<7} {b.schema_version:>6}"
            f" {sum(b.row_counts.values()):>10}"
        )


@app.command()
def restore(
    backup_id: str = typer.Argument(..., metavar="ID", help="A backup id from `xswarm backup list`, or `latest`."),
    to: Path | None = typer.Option(None, "--to", help="Database file to write (default: this node's database path)."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing file, even the live database (stop xswarm first)."
    ),
) -> None:
    """Write a backup as a new database file, after checking its checksum, schema and row counts."""
    from engine.paths import resolve_paths
    from engine.storage import StorageError
    from engine.storage.backup import BackupError, restore_backup

    settings = load()
    live = None if settings.database.url else (settings.database.path or resolve_paths().database)
    if to is None:
        if live is None:
            fail("the database is a remote libSQL server: pass --to PATH to write a local file", EXIT_BAD_INPUT)
        to = live
    store = _store(settings)
    try:
        result = restore_backup(store, backup_id, to, force=force, live=live)
    except (BackupError, StorageError) as exc:
        fail(str(exc))
    rows = sum(result.row_counts.values())
    typer.echo(
        f"restored {result.backup.id} to {result.path}: {rows} rows in {len(result.row_counts)} tables, "
        f"schema version {result.backup.schema_version} ({result.seconds:.1f}s)"
    )


@app.command()
def prune(
    days: int | None = typer.Option(
        None, "--days", min=1, help="Keep this many days (default: backup.retention_days)."
    ),
) -> None:
    """Delete backups older than the retention period (the newest one is always kept)."""
    from engine.storage import StorageError
    from engine.storage.backup import prune_backups

    settings = load()
    store = _store(settings)
    try:
        deleted = prune_backups(store, days or settings.backup.retention_days)
    except StorageError as exc:
        fail(str(exc))
    for backup_id in deleted:
        typer.echo(f"deleted {backup_id}")
    typer.echo(f"{len(deleted)} backup(s) deleted")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
