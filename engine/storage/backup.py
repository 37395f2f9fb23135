"""Database backups: consistent snapshots, compressed, checksummed, uploaded, pruned, restored.

Two ways to take a consistent copy while xswarm keeps writing:

* embedded file: ``VACUUM INTO`` on a separate connection. It reads inside one transaction,
  so with WAL the writer carries on and the copy is the database as of one commit; the copy
  is also compact (no free pages) and needs no WAL to open.
* remote libSQL server (sqld/Turso): a logical dump (schema, then multi-row INSERTs) read
  inside one ``BEGIN`` … ``ROLLBACK`` on the server (snapshot isolation), streamed through
  the compressor so it never sits in memory whole.

Each backup is one object ``backups/<id>.<db|sql>.<zst|gz>`` whose metadata carries the
schema version, row counts per table, the sha256 of the uncompressed content and the codec.
Restore checks all of that, writes a NEW file beside the destination and renames it into
place only when it opens, passes ``PRAGMA quick_check`` and holds the recorded row counts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from engine.paths import resolve_paths
from engine.storage import codec
from engine.storage.base import ObjectInfo, ObjectStore, StorageError
from engine.store import migrations
from engine.store.db import Database, Target

log = logging.getLogger("xswarm.backup")

PREFIX = "backups/"
_FORMAT_EXT = {"sqlite": ".db", "sql": ".sql"}
_DUMP_PAGE = 5000
_INSERT_ROWS = 200
Method = Literal["auto", "snapshot", "dump"]


class BackupError(Exception):
    """A backup or restore cannot go on; the message tells the operator what to do."""


@dataclass(frozen=True)
class Backup:
    id: str
    key: str
    created_at: float
    size: int
    """Compressed bytes in the store."""
    format: str
    """"sqlite" (a database file) or "sql" (a logical dump)."""
    compression: str
    schema_version: int
    row_counts: dict[str, int]
    content_sha256: str
    source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Restored:
    path: Path
    backup: Backup
    row_counts: dict[str, int]
    seconds: float


def new_id(now: float | None = None) -> str:
    """Sortable by time, unique across nodes taking backups in the same second."""
    stamp = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
    return stamp.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _id_time(backup_id: str) -> float:
    return datetime.strptime(backup_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()


# ---------------------------------------------------------------------------- inventory


def inventory(path: Path) -> tuple[int, dict[str, int]]:
    """Schema version and row count per table of a database file (through the store's
    own ``migrations.version``/``tables``, so "table" means the same thing everywhere)."""
    db = Database(Target(str(path)))
    try:
        names = migrations.tables(db)
        version = migrations.version(db) if "schema_migrations" in names else 0
        counts = {name: int(db.query(f'SELECT count(*) FROM "{name}"')[0][0]) for name in names}
        problems = db.query("PRAGMA quick_check")
    finally:
        db.close()
    if problems != [("ok",)]:
        raise BackupError(f"{path} fails the integrity check: {problems[:3]}")
    return version, counts


# ------------------------------------------------------------------------------ create


def create_backup(
    db: Database,
    store: ObjectStore,
    *,
    method: Method = "auto",
    workdir: Path | None = None,
    compression: str | None = None,
) -> Backup:
    """Take a consistent copy of ``db`` (which may be in use), compress and upload it."""
    remote = db.target.remote
    if method == "auto":
        method = "dump" if remote else "snapshot"
    if method == "snapshot" and remote:
        raise BackupError("a remote libSQL server cannot be snapshotted into a local file; use a logical dump")
    codec_name = compression or codec.best()
    backup_id = new_id()
    folder = workdir or resolve_paths().cache / "backups"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="backup-", dir=folder) as tmp:
        packed = Path(tmp) / "packed"
        if method == "snapshot":
            fmt = "sqlite"
            snapshot = Path(tmp) / "snapshot.db"
            _vacuum_into(db.target, snapshot)
            version, counts = inventory(snapshot)
            content_sha, _ = codec.compress_file(codec_name, snapshot, packed)
        else:
            fmt = "sql"
            with open(packed, "wb") as raw:
                out = codec.HashingWriter(codec_name, raw)
                version, counts = dump(db.target, out.write)
                content_sha = out.close()
        key = f"{PREFIX}{backup_id}{_FORMAT_EXT[fmt]}{codec.EXTENSIONS[codec_name]}"
        metadata = {
            "backup-id": backup_id,
            "format": fmt,
            "compression": codec_name,
            "schema-version": str(version),
            "row-counts": json.dumps(counts, separators=(",", ":")),
            "content-sha256": content_sha,
            "source": "remote" if remote else "embedded",
        }
        info = store.put_file(key, packed, metadata)
    log.info(
        "backup %s: %d bytes, %d rows, %.2fs", backup_id, info.size, sum(counts.values()), time.perf_counter() - started
    )
    return Backup(
        backup_id,
        key,
        _id_time(backup_id),
        info.size,
        fmt,
        codec_name,
        version,
        counts,
        content_sha,
        metadata["source"],
    )


def _vacuum_into(target: Target, dest: Path) -> None:
    conn = target.connect()
    try:
        conn.execute("VACUUM INTO ?", (str(dest),))
    except Exception as exc:
        raise BackupError(f"cannot snapshot {target.describe()}: {exc}") from exc
    finally:
        conn.close()


# --------------------------------------------------------------------------- logical dump


def dump(target: Target, write: Callable[[bytes], Any]) -> tuple[int, dict[str, int]]:
    """Write a SQL script that rebuilds the database; returns (schema version, row counts).

    Everything is read inside one transaction, so the script is one consistent state. Rows
    are paged by rowid (keyset, not OFFSET) to keep each request small on a remote server.
    """
    conn = target.connect()
    try:
        conn.execute("BEGIN")
        schema = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'libsql_%' AND name NOT LIKE '_litestream%' "
            "ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END, rowid"
        ).fetchall()
        tables = [(name, sql) for kind, name, _, sql in schema if kind == "table"]
        has_versions = any(name == "schema_migrations" for name, _ in tables)
        version = (
            int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchall()[0][0])
            if has_versions
            else 0
        )
        write(f"-- xswarm logical backup, schema version {version}\nPRAGMA foreign_keys=OFF;\nBEGIN;\n".encode())
        counts: dict[str, int] = {}
        for name, sql in tables:
            write(f"{sql};\n".encode())
            counts[name] = 0
            for batch in _pages(conn, name):
                counts[name] += len(batch)
                for start in range(0, len(batch), _INSERT_ROWS):
                    rows = ",".join(
                        "(" + ",".join(map(_literal, row)) + ")" for row in batch[start : start + _INSERT_ROWS]
                    )
                    write(f"INSERT INTO {_quote(name)} VALUES{rows};\n".encode())
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchall():
            write(b"DELETE FROM sqlite_sequence;\n")
            for seq_name, seq in conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall():
                write(
                    f"INSERT INTO sqlite_sequence(name, seq) VALUES({_literal(seq_name)}, {_literal(seq)});\n".encode()
                )
        for kind, _, _, sql in schema:
            if kind != "table":
                write(f"{sql};\n".encode())
        write(b"COMMIT;\n")
        return version, counts
    except BackupError:
        raise
    except Exception as exc:
        raise BackupError(f"cannot dump {target.describe()}: {exc}") from exc
    finally:
        try:
            conn.execute("ROLLBACK")
        except Exception:
            pass
        conn.close()


def _pages(conn: Any, table: str) -> Iterator[list[tuple[Any, ...]]]:
    quoted = _quote(table)
    try:
        conn.execute(f"SELECT rowid FROM {quoted} LIMIT 0").fetchall()
    except Exception:  # WITHOUT ROWID: no keyset column to page by, read it in one go
        yield conn.execute(f"SELECT * FROM {quoted}").fetchall()
        return
    last: int | None = None
    while True:
        if last is None:
            rows = conn.execute(f"SELECT rowid, * FROM {quoted} ORDER BY rowid LIMIT {_DUMP_PAGE}").fetchall()
        else:
            rows = conn.execute(
                f"SELECT rowid, * FROM {quoted} WHERE rowid > ? ORDER BY rowid LIMIT {_DUMP_PAGE}", (last,)
            ).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        yield [row[1:] for row in rows]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any) -> str:
    """A SQL literal that reads back as the same value and type."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NULL"  # SQLite stores NaN as NULL anyway
        if math.isinf(value):
            return "9e999" if value > 0 else "-9e999"
        return repr(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "X'" + bytes(value).hex() + "'"
    text = str(value).replace("'", "''")
    if "\x00" in text:  # a raw NUL would cut the statement short in the C API
        return "(" + "||char(0)||".join(f"'{part}'" for part in text.split("\x00")) + ")"
    return f"'{text}'"


def load_dump(script: Path, dest: Path) -> None:
    """Replay a logical dump into a new database file, statement by statement."""
    conn = Target(str(dest)).connect()
    try:
        buffer = ""
        with open(script, encoding="utf-8") as lines:
            for line in lines:
                buffer += line
                if line.rstrip().endswith(";") and sqlite3.complete_statement(buffer):
                    statement = buffer.strip()
                    buffer = ""
                    if statement.startswith("--"):
                        statement = statement.split("\n", 1)[1] if "\n" in statement else ""
                    if statement:
                        conn.execute(statement)
        if buffer.strip():
            raise BackupError("the dump ends in the middle of a statement")
        conn.commit()
    except BackupError:
        raise
    except Exception as exc:
        raise BackupError(f"cannot replay the dump: {exc}") from exc
    finally:
        conn.close()


# ------------------------------------------------------------------------ list and prune


def list_backups(store: ObjectStore) -> list[Backup]:
    """Every backup in the store, newest first."""
    found = []
    for info in store.list(PREFIX):
        try:
            found.append(_describe(store, info))
        except (StorageError, ValueError, KeyError) as exc:
            log.warning("skipping %s: %s", info.key, exc)
    found.sort(key=lambda b: b.id, reverse=True)
    return found


def _describe(store: ObjectStore, info: ObjectInfo) -> Backup:
    meta = info.metadata if info.metadata is not None else store.head(info.key).metadata or {}
    backup_id = meta["backup-id"]
    return Backup(
        id=backup_id,
        key=info.key,
        created_at=_id_time(backup_id),
        size=info.size,
        format=meta["format"],
        compression=meta["compression"],
        schema_version=int(meta["schema-version"]),
        row_counts={str(k): int(v) for k, v in json.loads(meta["row-counts"]).items()},
        content_sha256=meta["content-sha256"],
        source=meta.get("source", ""),
    )


def find_backup(store: ObjectStore, backup_id: str) -> Backup:
    """``backup_id`` or ``latest``."""
    if backup_id == "latest":
        backups = list_backups(store)
        if not backups:
            raise BackupError(f"no backups in {store.describe()}")
        return backups[0]
    if not backup_id or "/" in backup_id or backup_id.startswith("."):
        raise BackupError(f"invalid backup id {backup_id!r}")
    matches = [info for info in store.list(f"{PREFIX}{backup_id}.")]
    if not matches:
        raise BackupError(f"no backup {backup_id!r} in {store.describe()} (see `xswarm backup list`)")
    return _describe(store, matches[0])


def _dated(store: ObjectStore) -> list[tuple[float, str, ObjectInfo]]:
    """(time, id, object) of every backup, newest first, from the keys alone (no per-object
    requests); keys that are not ``<id>.…`` are not ours and are left out."""
    found = []
    for info in store.list(PREFIX):
        backup_id = info.key[len(PREFIX) :].split(".", 1)[0]
        try:
            found.append((_id_time(backup_id), backup_id, info))
        except ValueError:
            continue
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return found


def latest_backup_time(store: ObjectStore) -> float | None:
    """When the newest backup was taken (the runtime's "is one due?")."""
    dated = _dated(store)
    return dated[0][0] if dated else None


def prune_backups(store: ObjectStore, retention_days: int, *, now: float | None = None, keep: int = 1) -> list[str]:
    """Delete backups older than ``retention_days``, always keeping the newest ``keep``
    (a stopped node must not wake up to an empty bucket). Returns the deleted ids."""
    cutoff = (time.time() if now is None else now) - retention_days * 86400
    deleted = []
    for created, backup_id, info in _dated(store)[keep:]:
        if created < cutoff:
            store.delete(info.key)
            deleted.append(backup_id)
    return deleted


# ------------------------------------------------------------------------------ restore


def restore_backup(
    store: ObjectStore,
    backup_id: str,
    dest: Path,
    *,
    force: bool = False,
    live: Path | None = None,
) -> Restored:
    """Write the backup as a new database file at ``dest``, checked before it appears.

    ``dest`` must not exist unless ``force``; ``live`` (the running database's file) is named
    in the refusal so the operator knows to stop xswarm first.
    """
    started = time.perf_counter()
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and not force:
        if live is not None and dest.resolve() == Path(live).resolve():
            raise BackupError(f"{dest} is the live database: stop xswarm, then pass --force to replace it")
        raise BackupError(f"{dest} already exists: choose another --to path or pass --force")
    backup = find_backup(store, backup_id)
    newest = max(m.version for m in migrations.available())
    if backup.schema_version > newest:
        raise BackupError(
            f"backup {backup.id} has schema version {backup.schema_version}, newer than this xswarm "
            f"knows ({newest}): upgrade xswarm first"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=dest.parent) as tmp:
        packed = Path(tmp) / "packed"
        store.get_file(backup.key, packed)  # checks the sha256 of the stored bytes
        content = Path(tmp) / ("restored.db" if backup.format == "sqlite" else "dump.sql")
        try:
            content_sha, _ = codec.decompress_file(backup.compression, packed, content)
        except (OSError, ValueError, EOFError) as exc:
            raise BackupError(f"backup {backup.id} cannot be decompressed: {exc}") from exc
        if content_sha != backup.content_sha256:
            raise BackupError(f"backup {backup.id} is corrupt: its content does not match the recorded sha256")
        database = Path(tmp) / "restored.db"
        if backup.format == "sql":
            load_dump(content, database)
        version, counts = inventory(database)
        if version != backup.schema_version:
            raise BackupError(f"backup {backup.id}: schema version {version}, expected {backup.schema_version}")
        if counts != backup.row_counts:
            raise BackupError(f"backup {backup.id}: row counts {counts} differ from the recorded {backup.row_counts}")
        if force:
            for suffix in ("-wal", "-shm"):  # a stale WAL would be replayed onto the new file
                Path(f"{dest}{suffix}").unlink(missing_ok=True)
        os.replace(database, dest)
    return Restored(dest, backup, counts, time.perf_counter() - started)


__all__ = [
    "Backup",
    "BackupError",
    "Restored",
    "create_backup",
    "dump",
    "find_backup",
    "inventory",
    "latest_backup_time",
    "list_backups",
    "load_dump",
    "prune_backups",
    "restore_backup",
]
