"""``xswarm webhooks serve --workers N``: N server processes sharing one port.

Why: one server process is one event loop and one GIL, so it tops out near one core
(figures: docs/performance.md, "Webhooks").

How: the parent binds the port once with ``SO_REUSEPORT`` (resolving port 0) without
listening on it, then spawns the workers; each binds its own ``SO_REUSEPORT`` socket on that
port and the kernel spreads new connections over them. The workers share only the
database. Each runs its own inbox processor: rows are claimed with leases
(``engine.store.inbox``), so no two workers apply the same row, and an SMS whose route ran in
another worker is still answered once (its reply is on record, see ``webhooks.twilio_sms``).
Rate limits are per worker, so each gets 1/N of the configured rate. Workers log through
the parent, which owns the log file. A worker that dies is restarted; one that keeps dying
within seconds of starting stops the whole server with its reason.

Linux (and other systems with ``SO_REUSEPORT`` load balancing) only.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue

from webhooks.limits import RateLimit

log = logging.getLogger("xswarm.webhooks.workers")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
CRASH_WINDOW_S = 10.0
"""A worker that dies this soon after starting counts as a failed start."""
MAX_FAILED_STARTS = 3
"""Failed starts in a row before the parent gives up."""


class WorkersError(Exception):
    """The workers could not be started (the message says why)."""


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker is told (picklable: it crosses into a spawned process)."""

    host: str
    port: int
    count: int
    rate_limit: RateLimit | None
    metrics_dir: str | None = None
    """Where the workers' metrics files go (``webhooks.metrics``: one merged /metrics)."""

    def share(self) -> RateLimit | None:
        """One worker's part of the rate limit."""
        if self.rate_limit is None:
            return None
        return RateLimit(self.rate_limit.rate / self.count, max(1.0, self.rate_limit.burst / self.count))


def supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def reserve(host: str, port: int) -> socket.socket:
    """Bind (not listen) a ``SO_REUSEPORT`` socket: it fixes the port the workers share and
    fails early, in the parent, when the port is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class Workers:
    """The parent's side: start, watch, restart and stop the worker processes."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self._ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited threads or loops
        self.records: Queue[logging.LogRecord] = self._ctx.Queue()
        self._ready: Queue[tuple[int, str]] = self._ctx.Queue()
        self._procs: dict[int, SpawnProcess] = {}
        self._started_at: dict[int, float] = {}
        self._failed_starts = 0

    def start(self) -> None:
        """Start every worker and wait until each listens (or raise ``WorkersError``)."""
        for index in range(self.plan.count):
            self._spawn(index)
        self._await_ready(set(range(self.plan.count)))

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs.values() if proc.pid is not None]

    def watch(self, stop: threading.Event, *, poll_s: float = 0.5) -> None:
        """Until ``stop`` is set: restart workers that exit. Raises ``WorkersError`` after
        ``MAX_FAILED_STARTS`` quick deaths in a row."""
        while not stop.wait(poll_s):
            for index, proc in list(self._procs.items()):
                if proc.is_alive():
                    continue
                lived = time.monotonic() - self._started_at[index]
                log.error(
                    "webhooks worker %d (pid %s) exited with %s after %.1f s; restarting",
                    index + 1,
                    proc.pid,
                    proc.exitcode,
                    lived,
                )
                self._failed_starts = self._failed_starts + 1 if lived < CRASH_WINDOW_S else 0
                if self._failed_starts >= MAX_FAILED_STARTS:
                    raise WorkersError(f"worker {index + 1} keeps exiting (code {proc.exitcode}); see the log")
                self._spawn(index)
                self._await_ready({index})

    def stop(self) -> None:
        """SIGTERM every worker (each drains its requests and processor), then wait."""
        for proc in self._procs.values():
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("webhooks worker pid %s did not stop in %.0f s; killing it", proc.pid, STOP_TIMEOUT_S)
                proc.kill()
                proc.join()
        self._procs.clear()

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(
            target=_worker_main,
            args=(index, self.plan, self.records, self._ready),
            name=f"xswarm-webhooks-{index + 1}",
            daemon=True,  # never outlive the parent
        )
        proc.start()
        self._procs[index] = proc
        self._started_at[index] = time.monotonic()

    def _await_ready(self, waiting: set[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            try:
                index, error = self._ready.get(timeout=max(0.05, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                dead = [i for i in waiting if not self._procs[i].is_alive()]
                if dead:
                    code = self._procs[dead[0]].exitcode
                    raise WorkersError(
                        f"worker {dead[0] + 1} exited during start-up (code {code}); see the log"
                    ) from None
                if time.monotonic() > deadline:
                    raise WorkersError(
                        f"workers {sorted(i + 1 for i in waiting)} did not start within {START_TIMEOUT_S:.0f} s"
                    ) from None
                continue
            if index not in waiting:
                continue  # not one we are waiting for (cannot happen: a worker reports once)
            if error:
                raise WorkersError(f"worker {index + 1}: {error}")
            waiting.discard(index)


def _worker_main(
    index: int, plan: WorkerPlan, records: Queue[logging.LogRecord], ready: Queue[tuple[int, str]]
) -> None:
    """A worker process: the webhook server on the shared port until SIGTERM (Ctrl-C is the
    parent's to handle: it stops the workers in order)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if plan.metrics_dir:
        from webhooks.metrics import use_multiprocess

        use_multiprocess(plan.metrics_dir)  # before the server creates its metrics
    import asyncio

    from engine.config import load_settings
    from engine.events import EventBus
    from engine.logging_setup import forward_to
    from engine.store.db import StoreError
    from engine.store.migrations import open_database
    from webhooks.server import WebhooksServer, quiet_gc, run

    forward_to(records)
    label = f"{index + 1}/{plan.count}"
    reported = False  # start-up ends with one message on ``ready``: "" (listening) or why not

    def report(error: str = "") -> None:
        nonlocal reported
        if not reported:
            reported = True
            ready.put((index, error))

    async def serve() -> None:
        settings = load_settings()
        try:
            db = open_database(settings)  # already migrated by the parent: this only opens it
        except StoreError as exc:
            report(f"cannot open the database: {exc}")
            return
        server = WebhooksServer(settings, db, EventBus(), rate_limit=plan.share(), inline_reads=True, worker=label)
        try:
            try:
                await server.start(plan.host, plan.port, reuse_port=True)
            except OSError as exc:
                report(f"cannot listen on {plan.host}:{plan.port}: {exc}")
                return
            quiet_gc()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            report()
            await stop.wait()
            await server.stop()
        finally:
            db.close()

    try:
        run(serve())
    except Exception as exc:  # the parent restarts a worker that dies after start-up
        logging.getLogger("xswarm.webhooks.workers").exception("webhooks worker %s failed", label)
        report(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


def serve_workers(plan: WorkerPlan, on_ready: Callable[[int], None], stop: threading.Event) -> None:
    """Run ``plan.count`` workers until ``stop`` is set; ``on_ready(port)`` once all listen.
    Raises ``WorkersError`` (or ``OSError`` when the port cannot be bound)."""
    from engine.logging_setup import listen

    if not supported():
        raise WorkersError("--workers above 1 needs SO_REUSEPORT (Linux); run one worker per port instead")
    reservation = reserve(plan.host, plan.port)
    # A fresh folder per run: prometheus_client sums every file in it. Under systemd it goes
    # in the unit's RuntimeDirectory (/run/xswarm), else in the temporary folder.
    metrics_dir = tempfile.mkdtemp(prefix="xswarm-webhooks-metrics-", dir=os.environ.get("RUNTIME_DIRECTORY"))
    plan = WorkerPlan(plan.host, reservation.getsockname()[1], plan.count, plan.rate_limit, metrics_dir)
    workers = Workers(plan)
    listener = listen(workers.records)
    try:
        workers.start()
        log.info("webhooks: %d workers on port %d (pids %s)", plan.count, plan.port, workers.pids())
        on_ready(plan.port)
        workers.watch(stop)
    finally:
        workers.stop()
        listener.stop()
        reservation.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
