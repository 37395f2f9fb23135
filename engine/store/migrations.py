"""Versioned schema migrations: ``migrations/NNNN_name.sql`` applied in order at start.

Each file runs once, in its own transaction together with its row in ``schema_migrations``,
so a crash mid-migration leaves the old version intact and the next start retries it.
Applying is idempotent: versions already recorded are skipped.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from engine.config import Settings
from engine.store.db import Database, StoreError

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped in the package, in version order."""
    folder = resources.files("engine.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(Path(entry.name).name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StoreError(f"duplicate migration versions: {versions}")
    return found


def _has_schema_table(db: Database) -> bool:
    return bool(db.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"))


def applied(db: Database) -> set[int]:
    """Versions already applied (reads only, so status works with a read-only token)."""
    if not _has_schema_table(db):
        return set()
    return {row[0] for row in db.query("SELECT version FROM schema_migrations")}


def migrate(db: Database) -> list[Migration]:
    """Apply every pending migration; returns the ones applied now.

    Each migration and its ``schema_migrations`` row are ONE write item (``submit_script``),
    so they commit together or not at all. When another node applies the same version first,
    our insert of its row conflicts, the whole script rolls back, and we count it as done."""
    db.write(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    done = applied(db)
    pending = [m for m in available() if m.version not in done]
    applied_now = []
    for migration in pending:
        statements: list[str | tuple[str, tuple[object, ...]]] = [s.strip() for s in _split(migration.sql) if s.strip()]
        statements.append(
            (
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, int(time.time() * 1000)),
            )
        )
        try:
            db.submit_script(statements).result()
        except StoreError as exc:
            if migration.version in applied(db):
                continue
            raise StoreError(f"migration {migration.version:04d}_{migration.name} failed: {exc}") from exc
        applied_now.append(migration)
    return applied_now


def open_database(settings: Settings) -> Database:
    """The started, migrated database the settings point at (the runtime and CLI use this)."""
    db = Database.from_settings(settings).start()
    try:
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def version(db: Database) -> int:
    """The highest applied version; 0 for a database never migrated."""
    if not _has_schema_table(db):
        return 0
    rows = db.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(rows[0][0])


def tables(db: Database) -> list[str]:
    rows = db.query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "AND name NOT LIKE 'libsql_%' AND name NOT LIKE '_litestream%' ORDER BY name"
    )
    return [r[0] for r in rows]


def _split(sql: str) -> list[str]:
    """Split a migration file into statements (our files keep ';' and '--' out of strings).
    A trigger's ``BEGIN … END`` holds several ';': pieces are joined until SQLite's own
    ``complete_statement`` says the statement is whole."""
    without_comments = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    statements, current = [], ""
    for piece in without_comments.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            statements.append(current.rstrip(";"))
            current = ""
    return [*statements, current.rstrip(";")]
