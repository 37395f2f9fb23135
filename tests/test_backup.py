"""Backups: consistent snapshots while writing, dumps of a real sqld, restore checks, retention,
and the `xswarm backup` commands, against the local folder and the real moto S3 server."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.s3 import S3Target
from typer.testing import CliRunner

from engine.config import load_settings
from engine.storage import IntegrityError, LocalStore, ObjectStore, open_store
from engine.storage.backup import (
    BackupError,
    create_backup,
    list_backups,
    prune_backups,
    restore_backup,
)
from engine.store.db import Database
from engine.store.migrations import migrate, open_database

DAY = 86400


@pytest.fixture
def live_db() -> Iterator[Database]:
    db = open_database(load_settings())
    db.write("INSERT INTO users (id, name, phone, created_at, updated_at) VALUES ('u1', 'Ann', '+15550001', 1, 1)")
    db.submit_many(
        "INSERT INTO events (at, type, call_id, summary, payload) VALUES (?, ?, ?, ?, ?)",
        [(i, "CallStarted", f"c{i}", "quote ' and\nnewline", b"\x00\xffbin") for i in range(3000)],
    ).result()
    yield db
    db.close()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    target: S3Target = request.getfixturevalue("s3_bucket")
    return target.store()


def _counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master"
                " WHERE type='table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'libsql_%'"
            )
        ]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["snapshot", "dump"])
def test_round_trip_restores_same_rows(live_db: Database, store: ObjectStore, tmp_path: Path, method: str) -> None:
    backup = create_backup(live_db, store, method=method)  # type: ignore[arg-type]
    assert backup.row_counts["events"] == 3000 and backup.row_counts["users"] == 1
    assert backup.schema_version >= 1 and backup.compression in ("zstd", "gzip")
    listed = list_backups(store)
    assert [b.id for b in listed] == [backup.id] and listed[0].row_counts == backup.row_counts
    restored = restore_backup(store, backup.id, tmp_path / "restored.db")
    assert restored.row_counts == backup.row_counts == _counts(tmp_path / "restored.db")
    conn = sqlite3.connect(tmp_path / "restored.db")
    assert conn.execute("SELECT summary, payload FROM events WHERE id = 7").fetchone() == (
        "quote ' and\nnewline",
        b"\x00\xffbin",
    )
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # The AUTOINCREMENT counter came along: new rows do not reuse ids.
    assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone() == (3000,)


def test_snapshot_is_consistent_while_writes_continue(live_db: Database, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        while not stop.is_set():
            live_db.submit_many(
                "INSERT INTO events (at, type) VALUES (?, ?)", [(written[0] + i, "Tick") for i in range(200)]
            ).result()
            written[0] += 200

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.1)
        backups = [create_backup(live_db, store, method=m) for m in ("snapshot", "dump")]  # type: ignore[arg-type]
    finally:
        stop.set()
        thread.join()
    assert written[0] > 0
    for backup in backups:
        path = restore_backup(store, backup.id, tmp_path / f"{backup.format}.db").path
        conn = sqlite3.connect(path)
        count, top = conn.execute("SELECT count(*), max(id) FROM events").fetchone()
        # One committed state: whole batches only, no gaps (ids are dense in this test).
        assert count == top == backup.row_counts["events"]
        assert (count - 3000) % 200 == 0


def test_dump_of_a_real_sqld_server(sqld, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = Database(sqld.target()).start()
    try:
        migrate(db)
        db.submit_many(
            "INSERT INTO events (at, type, summary, payload) VALUES (?, ?, ?, ?)",
            [(i, "T", f"row {i} 'q'", bytes([i % 256])) for i in range(12000)],
        ).result()
        store = LocalStore(tmp_path / "objects")
        with pytest.raises(BackupError, match="remote"):
            create_backup(db, store, method="snapshot")
        backup = create_backup(db, store)
        assert backup.format == "sql" and backup.source == "remote" and backup.row_counts["events"] == 12000
        restored = restore_backup(store, "latest", tmp_path / "from-sqld.db")
        conn = sqlite3.connect(restored.path)
        assert conn.execute("SELECT summary, payload FROM events WHERE at = 300").fetchone() == (
            "row 300 'q'",
            bytes([44]),
        )
        live_rows = db.query("SELECT id, at, type, summary, payload FROM events ORDER BY id")
        assert conn.execute("SELECT id, at, type, summary, payload FROM events ORDER BY id").fetchall() == live_rows
    finally:
        db.close()


def test_restore_refuses_to_overwrite(live_db: Database, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    backup = create_backup(live_db, store)
    live = Path(live_db.target.location)
    with pytest.raises(BackupError, match="live database.*--force"):
        restore_backup(store, backup.id, live, live=live)
    other = tmp_path / "taken.db"
    other.write_bytes(b"precious")
    with pytest.raises(BackupError, match="already exists"):
        restore_backup(store, backup.id, other)
    assert other.read_bytes() == b"precious"
    Path(f"{other}-wal").write_bytes(b"stale wal")
    restore_backup(store, backup.id, other, force=True)
    assert not Path(f"{other}-wal").exists() and _counts(other)["events"] == 3000
    with pytest.raises(BackupError, match="no backup"):
        restore_backup(store, "20200101T000000Z-000000", tmp_path / "x.db")


def test_restore_detects_a_corrupted_backup(
    live_db: Database, store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backup = create_backup(live_db, store)
    if isinstance(store, LocalStore):
        path = store.root / backup.key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        target: S3Target = request.getfixturevalue("s3_bucket")
        client = target.client()
        head = client.head_object(Bucket=target.bucket, Key=backup.key)
        body = bytearray(client.get_object(Bucket=target.bucket, Key=backup.key)["Body"].read())
        body[len(body) // 2] ^= 0xFF
        client.put_object(Bucket=target.bucket, Key=backup.key, Body=bytes(body), Metadata=head["Metadata"])
    dest = tmp_path / "r.db"
    with pytest.raises(IntegrityError):
        restore_backup(store, backup.id, dest)
    assert not dest.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".restore")] == []


def test_restore_refuses_a_newer_schema_and_a_wrong_content_hash(live_db: Database, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    backup = create_backup(live_db, store)
    packed = tmp_path / "packed"
    store.get_file(backup.key, packed)
    meta = dict(store.head(backup.key).metadata or {})
    store.put_file(backup.key, packed, {**meta, "schema-version": "9999"})
    with pytest.raises(BackupError, match="newer than this xswarm"):
        restore_backup(store, backup.id, tmp_path / "a.db")
    store.put_file(backup.key, packed, {**meta, "content-sha256": "0" * 64})
    with pytest.raises(BackupError, match="corrupt"):
        restore_backup(store, backup.id, tmp_path / "b.db")
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "b.db").exists()


def test_retention_keeps_recent_and_the_newest(live_db: Database, store: ObjectStore) -> None:
    store.put_bytes("backups/zz-notes.txt", b"an operator's file, not a backup")
    first = create_backup(live_db, store)
    second = create_backup(live_db, store)
    now = time.time()
    assert prune_backups(store, 30, now=now + 29 * DAY) == []
    deleted = prune_backups(store, 30, now=now + 31 * DAY)
    newest = max(first.id, second.id)
    assert deleted == [min(first.id, second.id)]
    assert [b.id for b in list_backups(store)] == [newest]  # never prunes the last backup
    assert prune_backups(store, 1, now=now + 400 * DAY) == []
    assert store.exists("backups/zz-notes.txt")  # not ours: never pruned, never "the newest"


# ------------------------------------------------------------------------------------ CLI


def _cli(*args: str) -> object:
    from xswarm_tui.commands.backup import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cli_create_list_restore_prune(where: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if where == "s3":
        request.getfixturevalue("s3_env")
    missing = _cli("create")
    assert missing.exit_code == 1 and "no database" in missing.output  # type: ignore[attr-defined]
    db = open_database(load_settings())
    db.submit_many("INSERT INTO events (at, type) VALUES (?, ?)", [(i, "T") for i in range(500)]).result()
    try:
        created = _cli("create")
        assert created.exit_code == 0, created.output  # type: ignore[attr-defined]
        backup_id = created.stdout.strip()  # type: ignore[attr-defined]
        listed = _cli("list", "--json")
        entries = json.loads(listed.stdout)  # type: ignore[attr-defined]
        assert [e["id"] for e in entries] == [backup_id] and entries[0]["row_counts"]["events"] == 500
        assert backup_id in _cli("list").stdout  # type: ignore[attr-defined]
        refused = _cli("restore", backup_id)  # default target: the live database
        assert refused.exit_code == 1 and "live database" in refused.output  # type: ignore[attr-defined]
        restored = _cli("restore", backup_id, "--to", str(tmp_path / "copy.db"))
        assert restored.exit_code == 0, restored.output  # type: ignore[attr-defined]
        assert _counts(tmp_path / "copy.db")["events"] == 500
        assert _cli("prune").stdout.strip().endswith("0 backup(s) deleted")  # type: ignore[attr-defined]
    finally:
        db.close()


def test_cli_missing_bucket_is_one_clear_line(s3_env: S3Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSWARM_S3_BUCKET", "bucket-that-is-not-there")
    result = _cli("list")
    assert result.exit_code == 1  # type: ignore[attr-defined]
    assert "does not exist" in result.output and "Traceback" not in result.output  # type: ignore[attr-defined]


def test_rebuild_a_lost_machine_from_the_bucket(
    s3_env: S3Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's one command: a fresh XSWARM_HOME + the bucket's variables -> the database back."""
    db = open_database(load_settings())
    db.write("INSERT INTO users (id, name, created_at, updated_at) VALUES ('u9', 'Zed', 1, 1)")
    assert _cli("create").exit_code == 0  # type: ignore[attr-defined]
    before = _counts(Path(db.target.location))
    db.close()
    monkeypatch.setenv("XSWARM_HOME", str(tmp_path / "new-machine"))  # the old disk is gone
    result = _cli("restore", "latest")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    restored = tmp_path / "new-machine" / "data" / "xswarm.db"
    assert _counts(restored) == before
    again = open_database(load_settings())  # the runtime opens (and migrates) it as usual
    try:
        assert again.query("SELECT name FROM users WHERE id = 'u9'") == [("Zed",)]
    finally:
        again.close()
    assert open_store(load_settings()).describe().startswith(f"bucket '{s3_env.bucket}'")
