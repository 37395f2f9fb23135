"""Versioned schema migrations: ``migrations/NNNN_name.sql`` applied in order at start.

Each file runs once, in its own transaction together with its row in ``schema_migrations``,
so a crash mid-migration leaves the old version intact and the next start retries it.
Applying is idempotent: versions already recorded are skipped.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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


def applied(db: Database) -> set[int]:
    db.write(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    return {row[0] for row in db.query("SELECT version FROM schema_migrations")}


def migrate(db: Database) -> list[Migration]:
    """Apply every pending migration; returns the ones applied now."""
    done = applied(db)
    pending = [m for m in available() if m.version not in done]
    for migration in pending:
        statements = [s.strip() for s in _split(migration.sql) if s.strip()]
        futures = [db.submit(s) for s in statements]
        futures.append(
            db.submit(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, int(time.time() * 1000)),
            )
        )
        try:
            for future in futures:
                future.result()
        except StoreError as exc:
            raise StoreError(f"migration {migration.version:04d}_{migration.name} failed: {exc}") from exc
    return pending


def version(db: Database) -> int:
    rows = db.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return int(rows[0][0])


def tables(db: Database) -> list[str]:
    rows = db.query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "AND name NOT LIKE 'libsql_%' AND name NOT LIKE '_litestream%' ORDER BY name"
    )
    return [r[0] for r in rows]


def _split(sql: str) -> list[str]:
    """Split a migration file into statements (our files keep ';' out of strings)."""
    without_comments = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return without_comments.split(";")
