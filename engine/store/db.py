"""Database access: one writer thread with group commit, and per-thread read connections.

Which client opens what: a remote libSQL/Turso URL (sqld) goes through the official
``libsql`` client; the EMBEDDED file goes through stdlib ``sqlite3`` (same file format, so
backups, restore and ``sqld`` still open it), because ``libsql`` keeps the GIL while a
statement runs and would stop every other thread of the process, the 80 ms voice tick
included (docs/performance.md, "Database"). Both are driven alike: autocommit mode with
explicit ``BEGIN`` and ``commit()``, WAL, ``synchronous=NORMAL`` (durable across a killed
process), ``busy_timeout``, foreign keys on.

Writes: neither client is asynchronous, and an asyncio loop must never wait on the database,
so every write is queued and ONE writer thread drains the queue into one transaction (up to
``batch_max_rows`` writes or ``batch_max_wait_ms``), commits, then resolves each caller's
future. A future resolves only after its row is committed: "acknowledged" means "durable",
and a process killed mid-batch loses only writes nobody was told about. Consecutive plain
``INSERT INTO t (…) VALUES (?, …)`` writes of one statement are sent as one multi-row INSERT
per chunk, with bound parameters only: against sqld each statement is one HTTP round trip.

Failures: a failed batch is rolled back and replayed one write per transaction, so a single
bad write fails alone. Against a remote server, a batch that failed before COMMIT (an
expired stream, a restarted server) is retried once on a fresh connection, and reads retry
once; a COMMIT whose outcome is unknown fails its writes as "outcome unknown" rather than
risk landing them twice. ``submit_script`` queues several statements that commit together
or not at all (migrations depend on that).

Reads use one connection per reading thread (embedded: WAL lets them run beside the writer);
async callers go through a small reader pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import libsql

from engine.config import Settings, secret
from engine.paths import resolve_paths
from engine.store.checkpoint import Checkpointer

log = logging.getLogger("xswarm.store")

Params = Sequence[Any]
Statement = tuple[str, tuple[Any, ...]]
"""One SQL statement with its bound parameters, as ``submit_script`` takes them."""
T = TypeVar("T")

_PARAMS_PER_STATEMENT = 8000
"""Bound parameters in one multi-row INSERT (SQLite's limit is 32,766); large enough that a
remote batch is a handful of requests, small enough to keep each request modest."""
_ROWS_PER_STATEMENT = 1000
BUSY_TIMEOUT_S = 5.0
"""How long the embedded file's writers wait for a lock another process holds."""


class StoreError(Exception):
    """The database could not do what was asked (unreachable, constraint, bad SQL)."""


def log_if_failed(
    what: str, logger: logging.Logger, level: int = logging.WARNING
) -> Callable[[concurrent.futures.Future[Any]], None]:
    """A done-callback for a write future nobody awaits: a failed write is a log line
    ("<what> not written: <why>") rather than an exception nobody sees."""

    def check(future: concurrent.futures.Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            logger.log(level, "%s not written: %s", what, exc)

    return check


@dataclass(frozen=True)
class Target:
    """Where the database lives: an embedded file or a remote libSQL/Turso URL."""

    location: str
    auth_token: str | None = None

    @property
    def remote(self) -> bool:
        return "://" in self.location and not self.location.startswith("file:")

    def connect(self) -> Any:
        """A new connection: ``libsql`` for a remote server, ``sqlite3`` for the file (see the
        module docstring). Either way in autocommit mode: transactions are explicit ``BEGIN``
        … ``commit()``, so nothing is opened implicitly."""
        if self.remote:
            return libsql.connect(self.location, auth_token=self.auth_token or "")
        # check_same_thread=False: each connection is used by one thread at a time, but close()
        # runs on whichever thread shuts the Database down.
        conn = sqlite3.connect(
            self.location,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_S,
            uri=self.location.startswith("file:"),
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def connect_writer(self) -> Any:
        """The writer's connection: the file's automatic checkpoints are off on it, because a
        ``Checkpointer`` thread does them off the commit path (see ``engine.store.checkpoint``),
        and so is SQLite's busy handler (see ``Database._begin``)."""
        if not self.remote:
            _check_writable(self.location)
        conn = self.connect()
        if not self.remote:
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("PRAGMA busy_timeout=0")  # Database._begin waits for the lock instead
        return conn

    def describe(self) -> str:
        """Safe to print: remote URLs lose any credentials embedded in them."""
        if self.remote:
            scheme, _, rest = self.location.partition("://")
            return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
        return self.location

    @classmethod
    def from_settings(cls, settings: Settings) -> Target:
        if settings.database.url:
            url = settings.database.url
            # Turso hands out libsql:// URLs; the Python client speaks Hrana over HTTPS for them.
            if url.startswith("libsql://"):
                url = "https://" + url[len("libsql://") :]
            return cls(url, secret(settings.database.auth_token))
        path = settings.database.path or resolve_paths().database
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(str(path))


@dataclass(slots=True)
class _Write:
    kind: Literal["one", "many", "script"]
    sql: str
    params: Any
    """``one``: a parameter tuple; ``many``: a list of them; ``script``: (sql, params) pairs."""
    returning: bool = False
    """Collect the statement's result rows for the caller."""
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)

    def rows(self) -> list[tuple[Any, ...]]:
        return [self.params] if self.kind == "one" else self.params


@dataclass(frozen=True)
class _InsertShape:
    """A single-row INSERT of ``?`` placeholders that can be widened to many rows."""

    head: str
    group: str
    columns: int
    tail: str
    """What follows the row (a conflict clause, RETURNING …); "" for a plain INSERT."""

    def statement(self, rows: int) -> str:
        return self.head + " " + ",".join([self.group] * rows) + (" " + self.tail if self.tail else "")

    @property
    def rows_per_statement(self) -> int:
        return max(1, min(_ROWS_PER_STATEMENT, _PARAMS_PER_STATEMENT // max(1, self.columns)))


_ONE_ROW_INSERT = re.compile(
    r"^\s*(INSERT\s+INTO\s+[\w\"\[\]`.]+\s*\([^()]*\)\s*VALUES)\s*(\(\s*\?(?:\s*,\s*\?)*\s*\))\s*(.*?)\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)


@functools.lru_cache(maxsize=256)
def _insert_shape(sql: str) -> _InsertShape | None:
    """The shape of ``sql`` if it is an INSERT of one row of ``?`` placeholders (``OR IGNORE``,
    expressions or literals in the row do not match)."""
    match = _ONE_ROW_INSERT.match(sql)
    if not match:
        return None
    group = re.sub(r"\s+", "", match.group(2))
    return _InsertShape(match.group(1), group, group.count("?"), match.group(3))


def _plain_insert(sql: str) -> _InsertShape | None:
    """The shape of a one-row INSERT with nothing after its row: the writer coalesces only
    these, because a conflict clause or RETURNING makes each write's own result matter."""
    shape = _insert_shape(sql)
    return shape if shape is not None and not shape.tail else None


def merge_inserts(inserts: list[Statement]) -> list[Statement]:
    """Identical single-row INSERTs become multi-row ones (bound parameters only), in the
    order each statement first appears. For scripts whose per-statement row counts nobody
    reads; a conflict clause is kept and still applies row by row."""
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for sql, params in inserts:
        groups.setdefault(sql, []).append(params)
    out: list[Statement] = []
    for sql, rows in groups.items():
        shape = _insert_shape(sql)
        if shape is None or len(rows) == 1:
            out.extend((sql, params) for params in rows)
            continue
        per = shape.rows_per_statement
        for start in range(0, len(rows), per):
            chunk = rows[start : start + per]
            out.append((shape.statement(len(chunk)), tuple(value for params in chunk for value in params)))
    return out


_STOP = object()


def _check_writable(location: str) -> None:
    """Refuse, in one line, a database file or ``-wal``/``-shm`` file this process cannot open
    for writing. Why here, before SQLite: it maps the ``-shm`` file, and a mapping it cannot
    keep ends the process with SIGBUS, without a word; unopened it says only "attempt to
    write a readonly database"."""
    if location.startswith("file:") or location == ":memory:":
        return
    for path in (location, location + "-wal", location + "-shm"):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OSError(
                f"{path} cannot be opened read-write ({exc.strerror}); xswarm needs read-write access to the"
                " database file and its -wal and -shm files"
            ) from None
        os.close(fd)


_STATEMENT_FAULTS = frozenset({"IntegrityError", "ProgrammingError", "DataError", "InterfaceError"})
"""DB-API errors that blame the statement, not the store."""


class _CommitFailed(Exception):
    """COMMIT itself failed (the cause is chained): for a remote server the outcome is unknown."""


class Database:
    """The process's one handle on the database. Start it once; share it everywhere."""

    def __init__(self, target: Target, *, batch_max_rows: int = 2000, batch_max_wait_ms: float = 1.0) -> None:
        self.target = target
        self.batch_max_rows = batch_max_rows
        self.batch_max_wait_s = batch_max_wait_ms / 1000
        self._queue: queue.SimpleQueue[_Write | object] = queue.SimpleQueue()
        self._local = threading.local()
        self._reader_conns: list[Any] = []
        self._reader_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._checkpointer: Checkpointer | None = None
        self._readers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="xswarm-db-read")
        self.commits = 0
        self.write_error: str | None = None
        """Why the last write failed for a storage reason (read-only file, full disk, I/O
        error, server unreachable); None once a write commits again. Statement faults (a
        constraint violated) do not count: the store is fine. ``/health`` reports it, since
        reads may still work while every write fails."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(
            Target.from_settings(settings),
            batch_max_rows=settings.database.batch_max_rows,
            batch_max_wait_ms=settings.database.batch_max_wait_ms,
        )

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> Database:
        """Open the writer connection and start the writer thread."""
        if self._writer is None:
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            writer = threading.Thread(target=self._write_loop, args=(ready,), name="xswarm-db-writer", daemon=True)
            writer.start()
            try:
                ready.result()  # raises StoreError if the database cannot be opened
            except BaseException:
                writer.join()
                raise
            self._writer = writer
            if not self.target.remote:
                self._checkpointer = Checkpointer(self.target.connect, lambda: self.commits)
                self._checkpointer.start()
        return self

    @property
    def started(self) -> bool:
        return self._writer is not None

    def close(self) -> None:
        """Flush queued writes, then stop the writer and the readers."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self._readers.shutdown(wait=True)
        with self._reader_lock:
            conns, self._reader_conns = self._reader_conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass

    def __enter__(self) -> Database:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- writes

    def submit(self, sql: str, params: Params = (), *, returning: bool = False) -> concurrent.futures.Future[Any]:
        """Queue one statement; the future resolves (rows if ``returning``, else rowcount)
        once it is committed, or fails with ``StoreError``."""
        return self._put(_Write("one", sql, tuple(params), returning=returning))

    def submit_many(self, sql: str, rows: Sequence[Params]) -> concurrent.futures.Future[Any]:
        """Queue one statement for many parameter rows (one future for all of them; it
        resolves to the number of rows)."""
        return self._put(_Write("many", sql, [tuple(r) for r in rows]))

    def submit_script(self, statements: Sequence[str | tuple[str, Params]]) -> concurrent.futures.Future[Any]:
        """Queue several statements that must commit together or not at all (one write
        item, one transaction). The future resolves to the list of rowcounts."""
        pairs = [(s, ()) if isinstance(s, str) else (s[0], tuple(s[1])) for s in statements]
        return self._put(_Write("script", "", pairs))

    def write(self, sql: str, params: Params = (), *, returning: bool = False) -> Any:
        """Blocking write for threads and the CLI (never call it on an event loop)."""
        return self.submit(sql, params, returning=returning).result()

    def _put(self, item: _Write) -> concurrent.futures.Future[Any]:
        if self._writer is None:
            raise StoreError("database is not started")
        shape = _plain_insert(item.sql) if item.kind != "script" and not item.returning else None
        if shape is not None and (
            len(item.params) != shape.columns
            if item.kind == "one"
            else any(len(row) != shape.columns for row in item.params)
        ):
            # Caught here because a widened statement would shift the other rows' values.
            item.future.set_exception(StoreError(f"expected {shape.columns} parameters per row for: {item.sql}"))
            return item.future
        self._queue.put(item)
        return item.future

    # ---------------------------------------------------------------------------- reads

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Blocking read on this thread's own connection.

        A remote read is tried twice: sqld expires a stream after ~10 s idle
        (``STREAM_EXPIRED``) and may interrupt one, and a read is safe to repeat."""
        attempts = 2 if self.target.remote else 1
        for attempt in range(attempts):
            try:
                return self._reader().execute(sql, tuple(params)).fetchall()
            except StoreError:
                raise
            except Exception as exc:  # libsql raises ValueError and its own types, sqlite3 its Error family
                self._drop_reader()  # a broken remote connection is reopened next time
                if attempt + 1 == attempts:
                    raise StoreError(f"read failed: {exc}") from exc
                log.info("remote read failed (%s); retrying on a new connection", exc)
        raise AssertionError("unreachable")

    async def aread(self, fn: Callable[[Database], T]) -> T:
        """Run a blocking repository function on the reader pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, fn, self)

    def ping(self) -> float:
        """Round trip of ``SELECT 1`` in seconds (the doctor and health checks use it)."""
        started = time.perf_counter()
        self.query("SELECT 1")
        return time.perf_counter() - started

    def _reader(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self.target.connect()
            except Exception as exc:
                raise StoreError(f"cannot open {self.target.describe()}: {exc}") from exc
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def _drop_reader(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._reader_lock:
                if conn in self._reader_conns:
                    self._reader_conns.remove(conn)

    # --------------------------------------------------------------------- writer thread

    def _write_loop(self, ready: concurrent.futures.Future[None]) -> None:
        conn: Any = None
        try:
            conn = self.target.connect_writer()
            if self.target.remote:
                conn.execute("SELECT 1").fetchall()  # a remote connect is lazy: prove it answers
        except Exception as exc:
            ready.set_exception(StoreError(f"cannot open {self.target.describe()}: {exc}"))
            return
        ready.set_result(None)
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch: list[_Write] = [first]  # type: ignore[list-item]
            deadline = time.monotonic() + self.batch_max_wait_s
            while len(batch) < self.batch_max_rows:
                try:
                    timeout = deadline - time.monotonic()
                    item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            try:
                conn = self._commit(conn, batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.exception("writer failed on a batch of %d", len(batch))
                for write in batch:
                    if not write.future.done():
                        write.future.set_exception(StoreError(f"writer failed: {exc}"))
        try:
            conn.close()
        except Exception:
            pass

    def _commit(self, conn: Any, batch: list[_Write]) -> Any:
        """Commit the batch as one transaction, or each write alone if that fails.

        A remote COMMIT that fails may still have been applied (the reply can be lost), so
        such a batch is not replayed: its writes fail as "outcome unknown" rather than risk
        landing twice. Every other failure happened before COMMIT and left nothing behind."""
        attempts = 2 if self.target.remote else 1
        for attempt in range(attempts):
            try:
                results = self._run(conn, batch)
            except _CommitFailed as exc:
                conn = self._reconnect(conn)
                if not self.target.remote:
                    return self._replay(conn, batch, exc.__cause__)
                log.error("COMMIT of %d writes failed, outcome unknown: %s", len(batch), exc.__cause__)
                self.write_error = f"commit failed: {exc.__cause__}"
                for item in batch:
                    item.future.set_exception(StoreError(f"commit outcome unknown: {exc.__cause__}"))
                return conn
            except Exception as exc:
                # Nothing was committed. A remote stream may just have expired while idle or
                # the server restarted: retry the whole batch once on a renewed connection.
                conn = self._reconnect(conn)
                if attempt + 1 == attempts:
                    return self._replay(conn, batch, exc)
                continue
            self.write_error = None
            for item, result in zip(batch, results, strict=True):
                item.future.set_result(result)
            return conn
        raise AssertionError("unreachable")

    def _replay(self, conn: Any, batch: list[_Write], exc: BaseException | None) -> Any:
        """Run each write of a failed batch in its own transaction: a bad one fails alone."""
        if len(batch) > 1:
            log.warning("batch of %d writes failed (%s); replaying one by one", len(batch), exc)
        for item in batch:
            try:
                (result,) = self._run(conn, [item])
            except Exception as item_exc:
                conn = self._reconnect(conn)
                cause = item_exc.__cause__ if isinstance(item_exc, _CommitFailed) else item_exc
                if type(cause).__name__ not in _STATEMENT_FAULTS:
                    self.write_error = str(cause)
                item.future.set_exception(StoreError(str(cause)))
            else:
                self.write_error = None
                item.future.set_result(result)
        return conn

    def _run(self, conn: Any, batch: list[_Write]) -> list[Any]:
        results: list[Any] = [None] * len(batch)
        self._begin(conn)
        try:
            i = 0
            while i < len(batch):
                item = batch[i]
                shape = _plain_insert(item.sql) if item.kind != "script" and not item.returning else None
                if shape is None:
                    results[i] = self._execute(conn, item)
                    i += 1
                    continue
                # A run of writes of the same plain INSERT becomes a few multi-row statements.
                rows: list[tuple[Any, ...]] = []
                j = i
                while (
                    j < len(batch) and batch[j].sql == item.sql and batch[j].kind != "script" and not batch[j].returning
                ):
                    item_rows = batch[j].rows()
                    rows.extend(item_rows)
                    results[j] = len(item_rows)
                    j += 1
                self._insert_rows(conn, shape, rows)
                i = j
            try:
                conn.commit()
            except Exception as exc:
                raise _CommitFailed() from exc
        except Exception:
            try:
                conn.rollback()
            except Exception:
                pass
            raise
        self.commits += 1
        return results

    def _begin(self, conn: Any) -> None:
        """Open the batch's transaction. The embedded file: take the write lock up front
        (``BEGIN IMMEDIATE``) and, while another process holds it, retry every 0.1-2 ms.

        Why not SQLite's own busy handler: it sleeps 1, 2, 5, 10 … 100 ms between tries, so
        when several processes write one file (webhook workers, a CLI command beside the
        runtime) a writer often slept 25 ms or more for a lock held well under 1 ms."""
        if self.target.remote:
            conn.execute("BEGIN")
            return
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.0001
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _execute(self, conn: Any, item: _Write) -> Any:
        if item.kind == "script":
            counts = []
            for sql, params in item.params:
                counts.append(conn.execute(sql, params).rowcount)
            return counts
        if item.kind == "many":
            conn.executemany(item.sql, item.params)
            return len(item.params)
        cur = conn.execute(item.sql, item.params)
        return cur.fetchall() if item.returning else cur.rowcount

    def _insert_rows(self, conn: Any, shape: _InsertShape, rows: list[tuple[Any, ...]]) -> None:
        per = shape.rows_per_statement
        for start in range(0, len(rows), per):
            chunk = rows[start : start + per]
            conn.execute(shape.statement(len(chunk)), [value for row in chunk for value in row])

    def _reconnect(self, conn: Any) -> Any:
        """After a failure the connection may be dead (remote) or mid-transaction; renew it."""
        try:
            conn.rollback()
            if self.target.remote:
                conn.execute("SELECT 1").fetchall()
            return conn
        except Exception:
            pass
        try:
            return self.target.connect_writer()
        except Exception as exc:
            log.error("database unreachable: %s", exc)
            return conn
