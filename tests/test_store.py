"""The store core against the embedded file, a real sqld, and sqld with JWT auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from engine.store import migrations
from engine.store.db import Database, StoreError, Target
from engine.store.migrations import Migration

CORE_TABLES = {
    "users",
    "api_keys",
    "calls",
    "messages",
    "webhook_inbox",
    "subscriptions",
    "billing_events",
    "audit_log",
    "nodes",
    "events",
    "schema_migrations",
}


@pytest.fixture
def db(store_target: Target) -> Iterator[Database]:
    with Database(store_target, batch_max_wait_ms=2) as database:
        migrations.migrate(database)
        yield database


def test_migrate_creates_core_tables_and_is_idempotent(db: Database) -> None:
    assert CORE_TABLES <= set(migrations.tables(db))
    assert migrations.version(db) == max(m.version for m in migrations.available())
    assert migrations.migrate(db) == []


def test_writes_are_group_committed_and_readable(db: Database) -> None:
    db.write("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    commits = db.commits
    futures = [db.submit("INSERT INTO t (k, v) VALUES (?, ?)", (i, f"v{i}")) for i in range(3000)]
    assert [f.result(timeout=30) for f in futures] == [1] * 3000
    assert db.query("SELECT COUNT(*), SUM(k) FROM t") == [(3000, sum(range(3000)))]
    assert db.commits - commits < 100  # thousands of rows, a handful of transactions
    assert db.query("SELECT v FROM t WHERE k = ?", (1234,)) == [("v1234",)]


def test_a_bad_write_fails_alone(db: Database) -> None:
    db.write("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    db.write("INSERT INTO t (k, v) VALUES (?, ?)", (5, "first"))
    futures = [db.submit("INSERT INTO t (k, v) VALUES (?, ?)", (i, "x")) for i in range(10)]
    other = db.submit("UPDATE t SET v = ? WHERE k = ?", ("changed", 5))
    with pytest.raises(StoreError, match="UNIQUE"):
        futures[5].result(timeout=30)
    assert all(f.result(timeout=30) == 1 for i, f in enumerate(futures) if i != 5)
    assert other.result(timeout=30) == 1
    assert db.query("SELECT COUNT(*) FROM t") == [(10,)]
    assert db.query("SELECT v FROM t WHERE k = 5") == [("changed",)]


def test_wrong_parameter_count_is_refused_before_it_can_shift_rows(db: Database) -> None:
    db.write("CREATE TABLE t (a INTEGER, b INTEGER)")
    good = db.submit("INSERT INTO t (a, b) VALUES (?, ?)", (1, 2))
    bad = db.submit("INSERT INTO t (a, b) VALUES (?, ?)", (3,))
    with pytest.raises(StoreError, match="expected 2 parameters"):
        bad.result(timeout=5)
    assert good.result(timeout=30) == 1
    assert db.query("SELECT a, b FROM t") == [(1, 2)]


def test_submit_many_and_returning(db: Database) -> None:
    db.write("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    assert (
        db.submit_many("INSERT INTO t (k, v) VALUES (?, ?)", [(i, str(i)) for i in range(2500)]).result(timeout=30)
        == 2500
    )
    rows = db.write(
        "INSERT INTO t (k, v) VALUES (?, ?) ON CONFLICT(k) DO NOTHING RETURNING k", (1, "dup"), returning=True
    )
    assert rows == []
    rows = db.write(
        "INSERT INTO t (k, v) VALUES (?, ?) ON CONFLICT(k) DO NOTHING RETURNING k", (9999, "new"), returning=True
    )
    assert rows == [(9999,)]
    assert db.query("SELECT COUNT(*) FROM t") == [(2501,)]


def test_submit_script_is_atomic(db: Database) -> None:
    with pytest.raises(StoreError):
        db.submit_script(
            [
                "CREATE TABLE half (a INTEGER)",
                ("INSERT INTO half (a) VALUES (?)", (1,)),
                "INSERT INTO nowhere VALUES (1)",
            ]
        ).result(timeout=30)
    assert "half" not in migrations.tables(db)
    counts = db.submit_script(["CREATE TABLE whole (a INTEGER)", ("INSERT INTO whole (a) VALUES (?)", (7,))])
    assert len(counts.result(timeout=30)) == 2
    assert db.query("SELECT a FROM whole") == [(7,)]


def test_a_failing_migration_leaves_nothing_behind(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    before = migrations.version(db)
    shipped = migrations.available()
    broken = Migration(before + 1, "broken", "CREATE TABLE extra (a INTEGER);\nINSERT INTO missing_table VALUES (1);")
    monkeypatch.setattr(migrations, "available", lambda: [*shipped, broken])
    with pytest.raises(StoreError, match=f"migration {before + 1:04d}_broken failed"):
        migrations.migrate(db)
    assert migrations.version(db) == before
    assert "extra" not in migrations.tables(db)
    fixed = Migration(before + 1, "fixed", "CREATE TABLE extra (a INTEGER);\nCREATE INDEX extra_a ON extra(a);")
    monkeypatch.setattr(migrations, "available", lambda: [*shipped, fixed])
    assert [m.name for m in migrations.migrate(db)] == ["fixed"]
    assert migrations.version(db) == before + 1
    assert "extra" in migrations.tables(db)


async def test_async_reads_and_writes_do_not_block_the_loop(db: Database) -> None:
    db.write("CREATE TABLE t (k INTEGER)")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.gather(*(asyncio.wrap_future(db.submit("INSERT INTO t (k) VALUES (?)", (i,))) for i in range(200)))
    assert await db.aread(lambda d: d.query("SELECT COUNT(*) FROM t")) == [(200,)]
    assert await db.aread(lambda d: d.query("SELECT MAX(k) FROM t")) == [(199,)]
    task.cancel()
    assert ticks > 1


def test_ping_measures_a_round_trip(db: Database) -> None:
    assert 0 < db.ping() < 5


def test_closing_flushes_queued_writes(store_target: Target) -> None:
    database = Database(store_target, batch_max_wait_ms=50).start()
    database.write("CREATE TABLE t (k INTEGER)")
    futures = [database.submit("INSERT INTO t (k) VALUES (?)", (i,)) for i in range(500)]
    database.close()
    assert all(f.done() and f.result() == 1 for f in futures)
    with Database(store_target) as again:
        assert again.query("SELECT COUNT(*) FROM t") == [(500,)]


def test_writing_before_start_is_an_error(store_target: Target) -> None:
    with pytest.raises(StoreError, match="not started"):
        Database(store_target).submit("SELECT 1")


def test_jwt_server_refuses_a_missing_or_forged_token(sqld_jwt) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StoreError, match="cannot open"):
        Database(Target(sqld_jwt.url, None)).start()
    forged = sqld_jwt.token[:-4] + ("AAAA" if not sqld_jwt.token.endswith("AAAA") else "BBBB")
    with pytest.raises(StoreError, match="cannot open"):
        Database(Target(sqld_jwt.url, forged)).start()
    with Database(Target(sqld_jwt.url, sqld_jwt.token)) as ok:
        assert ok.query("SELECT 1") == [(1,)]


def test_unreachable_server_is_a_clear_error() -> None:
    from fixtures.sqld import free_port

    with pytest.raises(StoreError, match=r"cannot open http://127\.0\.0\.1"):
        Database(Target(f"http://127.0.0.1:{free_port()}", None)).start()


def test_target_from_settings_prefers_turso_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.config import load_settings

    target = Target.from_settings(load_settings())
    assert not target.remote and target.location.endswith("xswarm.db")
    monkeypatch.setenv("TURSO_DATABASE_URL", "libsql://example-org.turso.io")
    monkeypatch.setenv("TURSO_AUTH_TOKEN", "tok")
    target = Target.from_settings(load_settings())
    assert target.remote and target.location == "https://example-org.turso.io" and target.auth_token == "tok"
    assert "tok" not in target.describe()


def test_writer_and_readers_survive_a_server_restart(sqld) -> None:  # type: ignore[no-untyped-def]
    with Database(sqld.target(), batch_max_wait_ms=1) as database:
        migrations.migrate(database)
        database.write("CREATE TABLE t (k INTEGER)")
        database.write("INSERT INTO t (k) VALUES (?)", (1,))
        assert database.query("SELECT COUNT(*) FROM t") == [(1,)]
        sqld.restart()  # every open stream is gone
        assert database.write("INSERT INTO t (k) VALUES (?)", (2,)) == 1
        assert database.query("SELECT SUM(k) FROM t") == [(3,)]


def test_a_bad_write_in_a_remote_batch_still_fails_alone(sqld) -> None:  # type: ignore[no-untyped-def]
    with Database(sqld.target(), batch_max_wait_ms=50) as database:
        database.write("CREATE TABLE t (k INTEGER PRIMARY KEY)")
        futures = [database.submit("INSERT INTO t (k) VALUES (?)", (k,)) for k in (1, 2, 2, 3)]
        outcomes = [f.exception(timeout=30) is None for f in futures]
        assert outcomes == [True, True, False, True]
        assert database.query("SELECT k FROM t ORDER BY k") == [(1,), (2,), (3,)]


def test_a_writer_bug_fails_the_batch_instead_of_hanging(store_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    with Database(store_target) as database:
        database.write("CREATE TABLE t (k INTEGER)")
        monkeypatch.setattr(database, "_commit", lambda conn, batch: 1 / 0)
        with pytest.raises(StoreError, match="writer failed: division by zero"):
            database.submit("INSERT INTO t (k) VALUES (?)", (1,)).result(timeout=10)
        monkeypatch.undo()
        assert database.write("INSERT INTO t (k) VALUES (?)", (2,)) == 1  # the writer lives on


def test_status_reads_work_with_a_read_only_token(sqld_jwt) -> None:  # type: ignore[no-untyped-def]
    with Database(sqld_jwt.target()) as writer:
        migrations.migrate(writer)
    read_only = Target(sqld_jwt.url, sqld_jwt.key.token(access="ro"))
    with Database(read_only) as database:
        assert migrations.version(database) >= 1 and "users" in migrations.tables(database)
        assert migrations.applied(database)
        with pytest.raises(StoreError):
            database.write("CREATE TABLE nope (a INTEGER)")


def test_a_fresh_database_reports_version_zero(store_target: Target) -> None:
    with Database(store_target) as database:
        assert migrations.version(database) == 0 and migrations.applied(database) == set()
        assert "schema_migrations" not in migrations.tables(database)


def test_embedded_file_is_plain_sqlite_in_autocommit_with_wal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The embedded file goes through stdlib sqlite3 (it releases the GIL; see db.py), with the
    same settings as before, no implicit transactions, and stays readable by the libsql client."""
    import libsql

    target = Target(str(tmp_path / "plain.db"))
    with Database(target, batch_max_wait_ms=1) as database:
        database.write("CREATE TABLE things (id TEXT PRIMARY KEY, name TEXT NOT NULL)")
        database.write("INSERT INTO things (id, name) VALUES (?, ?)", ("n1", "one"))
        conn = target.connect()
        try:
            settings = [
                conn.execute(f"PRAGMA {name}").fetchall()[0][0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            ]
            assert settings == ["wal", 1, 1, 5000]  # synchronous 1 = NORMAL
            conn.execute("UPDATE things SET name = ? WHERE id = ?", ("renamed", "n1"))
            assert not conn.in_transaction  # autocommit: a statement outside BEGIN is committed at once
            assert database.query("SELECT name FROM things WHERE id = ?", ("n1",)) == [("renamed",)]
        finally:
            conn.close()
    other = libsql.connect(str(tmp_path / "plain.db"))
    try:
        assert other.execute("SELECT name FROM things").fetchall() == [("renamed",)]
    finally:
        other.close()


def test_the_log_is_checkpointed_off_the_writer_and_emptied_on_close(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The writer never checkpoints (automatic checkpoints are off on its connection); the
    checkpointer thread copies the log back while writes go on; the log is gone after close."""
    import sqlite3

    path = tmp_path / "c.db"
    wal = tmp_path / "c.db-wal"
    database = Database(Target(str(path)), batch_max_wait_ms=1).start()
    database.write("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    checkpointer = database._checkpointer
    assert checkpointer is not None
    for _ in range(4):
        futures = [database.submit("INSERT INTO t (v) VALUES (?)", ("x" * 500,)) for _ in range(2000)]
        [f.result(timeout=30) for f in futures]
        time.sleep(0.4)  # longer than the checkpointer's interval
    assert checkpointer.passes >= 2
    probe = sqlite3.connect(path)
    try:
        busy, log_frames, copied = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        probe.close()
    assert log_frames == copied  # nothing the checkpointer had not already copied back
    database.close()
    assert not wal.exists() or wal.stat().st_size == 0
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (8000,)
    conn.close()


def test_a_writer_waits_for_another_process_holding_the_lock(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Another connection (as another process would) holds the write lock: queued writes
    commit as soon as it lets go; a lock held past the busy timeout fails them clearly."""
    import sqlite3
    import threading

    from engine.store import db as db_module

    path = tmp_path / "l.db"
    database = Database(Target(str(path)), batch_max_wait_ms=1).start()
    database.write("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, other.commit).start()
    started = time.monotonic()
    assert database.submit("INSERT INTO t (k) VALUES (1)").result(timeout=10) == 1
    waited = time.monotonic() - started
    assert 0.25 < waited < 0.35  # retried every few ms, not after SQLite's 25-100 ms sleeps
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_S", 0.2)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        database.submit("INSERT INTO t (k) VALUES (2)").result(timeout=10)
    other.commit()
    assert database.submit("INSERT INTO t (k) VALUES (3)").result(timeout=10) == 1
    other.close()
    database.close()
