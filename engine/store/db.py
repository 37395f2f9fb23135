"""libSQL access: one writer thread with group commit, and per-thread read connections.

Why a writer thread: the ``libsql`` client is synchronous, and an asyncio loop (the bridge's,
the webhooks') must never wait on the database. Every write is queued; the writer drains the
queue into ONE transaction (up to ``batch_max_rows`` statements or ``batch_max_wait_ms``),
commits, then resolves each caller's future. A future resolves only after its row is
committed, so "acknowledged" always means "durable": a process killed mid-batch loses only
writes nobody was told about.

If a batch fails (a constraint, a dropped connection), it is rolled back and replayed one
statement per transaction so a single bad write fails alone and the others still land.

Reads use one connection per reading thread (embedded: WAL lets them run beside the writer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import libsql

from engine.config import Settings, secret
from engine.paths import resolve_paths

log = logging.getLogger("xswarm.store")

Params = Sequence[Any]
T = TypeVar("T")


class StoreError(Exception):
    """The database could not do what was asked (unreachable, constraint, bad SQL)."""


@dataclass(frozen=True)
class Target:
    """Where the database lives: an embedded file or a remote libSQL/Turso URL."""

    location: str
    auth_token: str | None = None

    @property
    def remote(self) -> bool:
        return "://" in self.location and not self.location.startswith("file:")

    def connect(self) -> Any:
        if self.remote:
            return libsql.connect(self.location, auth_token=self.auth_token or "")
        conn = libsql.connect(self.location)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def describe(self) -> str:
        """Safe to print: remote URLs lose any credentials embedded in them."""
        if self.remote:
            scheme, _, rest = self.location.partition("://")
            return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
        return self.location

    @classmethod
    def from_settings(cls, settings: Settings) -> "Target":
        if settings.database.url:
            return cls(settings.database.url, secret(settings.database.auth_token))
        path = settings.database.path or resolve_paths().database
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(str(path))


@dataclass
class _Write:
    sql: str
    params: Params
    many: bool = False
    """``params`` is a sequence of parameter tuples for one statement (executemany)."""
    returning: bool = False
    """Collect the statement's result rows for the caller."""
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


_STOP = object()


class Database:
    """The process's one handle on the database. Start it once; share it everywhere."""

    def __init__(self, target: Target, *, batch_max_rows: int = 2000, batch_max_wait_ms: float = 5.0) -> None:
        self.target = target
        self.batch_max_rows = batch_max_rows
        self.batch_max_wait_s = batch_max_wait_ms / 1000
        self._queue: queue.SimpleQueue[_Write | object] = queue.SimpleQueue()
        self._local = threading.local()
        self._writer: threading.Thread | None = None
        self._readers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="xswarm-db-read")
        self.commits = 0
        self.rows_written = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Database":
        return cls(
            Target.from_settings(settings),
            batch_max_rows=settings.database.batch_max_rows,
            batch_max_wait_ms=settings.database.batch_max_wait_ms,
        )

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> "Database":
        """Open the writer connection and start the writer thread."""
        if self._writer is None:
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._writer = threading.Thread(target=self._write_loop, args=(ready,), name="xswarm-db-writer", daemon=True)
            self._writer.start()
            ready.result()  # raises StoreError if the database cannot be opened
        return self

    def close(self) -> None:
        """Flush queued writes, then stop the writer and the readers."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self._readers.shutdown(wait=True)

    def __enter__(self) -> "Database":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------- writes

    def submit(self, sql: str, params: Params = (), *, returning: bool = False) -> concurrent.futures.Future[Any]:
        """Queue one statement; the future resolves (rows if ``returning``, else rowcount)
        once it is committed, or fails with ``StoreError``."""
        return self._put(_Write(sql, tuple(params), returning=returning))

    def submit_many(self, sql: str, rows: Sequence[Params]) -> concurrent.futures.Future[Any]:
        """Queue one statement for many parameter rows (one future for all of them)."""
        return self._put(_Write(sql, [tuple(r) for r in rows], many=True))

    def write(self, sql: str, params: Params = (), *, returning: bool = False) -> Any:
        """Blocking write for threads and the CLI (never call it on an event loop)."""
        return self.submit(sql, params, returning=returning).result()

    async def awrite(self, sql: str, params: Params = (), *, returning: bool = False) -> Any:
        """Awaitable write: the loop keeps running while the writer commits."""
        return await asyncio.wrap_future(self.submit(sql, params, returning=returning))

    def _put(self, item: _Write) -> concurrent.futures.Future[Any]:
        if self._writer is None:
            raise StoreError("database is not started")
        self._queue.put(item)
        return item.future

    # ---------------------------------------------------------------------------- reads

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Blocking read on this thread's own connection."""
        try:
            return self._reader().execute(sql, tuple(params)).fetchall()
        except Exception as exc:  # libsql raises ValueError / its own errors for everything
            self._local.conn = None  # a broken remote connection is reopened next time
            raise StoreError(f"read failed: {exc}") from exc

    async def aquery(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Read on the reader pool so the calling loop never blocks."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self.query, sql, params)

    async def aread(self, fn: Callable[["Database"], T]) -> T:
        """Run a blocking repository function on the reader pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, fn, self)

    def _reader(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self.target.connect()
            except Exception as exc:
                raise StoreError(f"cannot open {self.target.describe()}: {exc}") from exc
            self._local.conn = conn
        return conn

    # --------------------------------------------------------------------- writer thread

    def _write_loop(self, ready: concurrent.futures.Future[None]) -> None:
        conn: Any = None
        try:
            conn = self.target.connect()
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
                    timeout = max(0.0, deadline - time.monotonic())
                    item = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            conn = self._commit(conn, batch)
        try:
            conn.close()
        except Exception:
            pass

    def _commit(self, conn: Any, batch: list[_Write]) -> Any:
        """Commit the batch as one transaction, or each write alone if that fails."""
        try:
            results = self._run(conn, batch)
        except Exception as exc:
            log.warning("batch of %d failed (%s); replaying one by one", len(batch), exc)
            conn = self._reconnect(conn)
            for item in batch:
                try:
                    (result,) = self._run(conn, [item])
                except Exception as item_exc:
                    conn = self._reconnect(conn)
                    item.future.set_exception(StoreError(str(item_exc)))
                else:
                    item.future.set_result(result)
            return conn
        for item, result in zip(batch, results):
            item.future.set_result(result)
        return conn

    def _run(self, conn: Any, batch: list[_Write]) -> list[Any]:
        results: list[Any] = []
        conn.execute("BEGIN")
        try:
            for item in batch:
                if item.many:
                    cur = conn.executemany(item.sql, item.params)
                    results.append(len(item.params))
                    self.rows_written += len(item.params)
                else:
                    cur = conn.execute(item.sql, item.params)
                    results.append(cur.fetchall() if item.returning else cur.rowcount)
                    self.rows_written += 1
            conn.commit()
        except Exception:
            try:
                conn.rollback()
            except Exception:
                pass
            raise
        self.commits += 1
        return results

    def _reconnect(self, conn: Any) -> Any:
        """After a failure the connection may be dead (remote) or mid-transaction; renew it."""
        try:
            conn.rollback()
            return conn
        except Exception:
            pass
        try:
            return self.target.connect()
        except Exception as exc:
            log.error("database unreachable: %s", exc)
            return conn
