"""Webhook server processes: ``xswarm webhooks serve --workers N``, and the webhooks of
``xswarm serve`` and the console (``WebhookProcesses``).

Why a node runs its webhooks in child processes: the real-time process (bridge, scheduler,
model, supervisor) must never parse webhook HTTP. Sharing its event loop and GIL, five
unsigned 100,000-field POSTs cost a live call ~2 s of audio; in a child they cost that child
alone. The child sends every event it publishes to the node's bus (so the console, the
supervisors, the metrics and the feed see them as before), and its log records to the node's
log.

Why several: one server process is one event loop and one GIL, so it tops out near one core
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
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from typing import Any

from engine.config import Settings
from engine.events import Event, EventBus, WireError, from_wire
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
    settings: Settings | None = None
    """The parent's settings; None: each worker loads them (env and config file), as the CLI does."""
    nice: int = 0
    """Added to each worker's scheduling niceness. A node's workers run at +10: when hostile
    traffic and live calls compete for the CPU, the calls' process wins."""
    forward_events: bool = False
    """Send every event to the parent's bus (``WebhookProcesses(bus=...)``), which records
    them in the feed; the workers then write no feed rows of their own."""

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
        self.events: Queue[dict[str, Any] | None] = self._ctx.Queue()
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
            args=(index, self.plan, self.records, self._ready, self.events),
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
    index: int,
    plan: WorkerPlan,
    records: Queue[logging.LogRecord],
    ready: Queue[tuple[int, str]],
    events: Queue[dict[str, Any] | None],
) -> None:
    """A worker process: the webhook server on the shared port until SIGTERM (Ctrl-C is the
    parent's to handle: it stops the workers in order)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if plan.nice:
        os.nice(plan.nice)
    _return_large_buffers()
    if plan.metrics_dir:
        from webhooks.metrics import use_multiprocess

        use_multiprocess(plan.metrics_dir)  # before the server creates its metrics
    import asyncio

    from engine.config import load_settings
    from engine.events import EventBus
    from engine.logging_setup import forward_to
    from engine.store.db import StoreError
    from engine.store.migrations import open_database
    from webhooks.server import WebhooksServer, run, tune_server_process

    forward_to(records)
    label = f"{index + 1}/{plan.count}"
    reported = False  # start-up ends with one message on ``ready``: "" (listening) or why not

    def report(error: str = "") -> None:
        nonlocal reported
        if not reported:
            reported = True
            ready.put((index, error))

    async def serve() -> None:
        settings = plan.settings or load_settings()
        try:
            db = open_database(settings)  # already migrated by the parent: this only opens it
        except StoreError as exc:
            report(f"cannot open the database: {exc}")
            return
        bus = EventBus()
        if plan.forward_events:
            bus.subscribe(lambda event: events.put(event.to_wire()))
        server = WebhooksServer(
            settings,
            db,
            bus,
            rate_limit=plan.share(),
            inline_reads=True,
            worker=label,
            record_feed=not plan.forward_events,
        )
        try:
            try:
                await server.start(plan.host, plan.port, reuse_port=True)
            except OSError as exc:
                report(f"cannot listen on {plan.host}:{plan.port}: {exc}")
                return
            tune_server_process()
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


class WebhookProcesses:
    """The parent's handle on its webhook processes: bind the port, start the workers, watch
    them (restarting any that exits) and stop them. Used by ``xswarm webhooks serve --workers``
    and by the runtime, whose webhooks always run here rather than on its own loop."""

    def __init__(self, plan: WorkerPlan, *, bus: EventBus | None = None) -> None:
        """``bus``: publish the workers' events there (sets ``plan.forward_events``)."""
        self.plan = replace(plan, forward_events=bus is not None)
        self.bus = bus
        self.workers: Workers | None = None
        self._reservation: socket.socket | None = None
        self._metrics_dir: str | None = None
        self._listener: Any = None
        self._forwarder: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        return self.plan.port

    def start(self) -> int:
        """Start every worker and return the port once all listen. Raises ``WorkersError``
        (or ``OSError`` when the port cannot be bound); nothing is left running then."""
        from engine.logging_setup import listen

        if not supported():
            raise WorkersError("webhook worker processes need SO_REUSEPORT (Linux, macOS)")
        self._reservation = reserve(self.plan.host, self.plan.port)
        # A fresh metrics folder per run: prometheus_client sums every file in it. Under
        # systemd it goes in the unit's RuntimeDirectory (/run/xswarm), else in the temporary folder.
        self._metrics_dir = tempfile.mkdtemp(prefix="xswarm-webhooks-metrics-", dir=os.environ.get("RUNTIME_DIRECTORY"))
        self.plan = replace(self.plan, port=self._reservation.getsockname()[1], metrics_dir=self._metrics_dir)
        self.workers = Workers(self.plan)
        self._listener = listen(self.workers.records)
        if self.bus is not None:
            self._forwarder = threading.Thread(target=self._forward, name="xswarm-webhook-events", daemon=True)
            self._forwarder.start()
        try:
            self.workers.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "webhooks: %d worker process(es) on port %d (pids %s)", self.plan.count, self.port, self.workers.pids()
        )
        return self.port

    def watch(self, stop: threading.Event) -> None:
        """Restart workers that exit until ``stop`` is set; raises ``WorkersError`` when one
        keeps dying."""
        assert self.workers is not None
        self.workers.watch(stop)

    def watch_in_background(self, on_give_up: Callable[[WorkersError], None]) -> None:
        """``watch`` on a thread of its own; ``on_give_up`` runs there if it gives up."""

        def watching() -> None:
            try:
                self.watch(self._stop)
            except WorkersError as exc:
                log.error("webhooks: %s; the node goes on without webhooks", exc)
                on_give_up(exc)

        self._watcher = threading.Thread(target=watching, name="xswarm-webhook-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop the watcher, then the workers (each drains its requests), then the log and
        event relays, then give the port back."""
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=STOP_TIMEOUT_S)
        if self.workers is not None:
            self.workers.stop()
            self.workers.events.put(None)
        if self._forwarder is not None:
            self._forwarder.join(timeout=5)
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None

    def _forward(self) -> None:
        assert self.workers is not None and self.bus is not None
        while True:
            wire = self.workers.events.get()
            if wire is None:
                return
            try:
                event = from_wire(wire)
            except WireError as exc:  # cannot happen between two copies of this code
                log.warning("webhook worker sent an unknown event: %s", exc)
                continue
            if isinstance(event, Event):
                self.bus.publish(event)


def _return_large_buffers(threshold: int = 256 * 1024) -> None:
    """glibc only: allocate every buffer over ``threshold`` with its own mmap, so it goes back
    to the system when freed. Why: glibc raises that threshold as large blocks are freed, after
    which a 29 MiB request body lands on the heap and the worker's RSS never comes down again
    (on the isolation benchmark: +94 MiB that stayed). Elsewhere the allocator's own rules apply."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
        return
    m_mmap_threshold = -3
    ctypes.CDLL(name).mallopt(m_mmap_threshold, threshold)


def serve_workers(plan: WorkerPlan, on_ready: Callable[[int], None], stop: threading.Event) -> None:
    """Run ``plan.count`` workers until ``stop`` is set; ``on_ready(port)`` once all listen.
    Raises ``WorkersError`` (or ``OSError`` when the port cannot be bound)."""
    processes = WebhookProcesses(plan)
    port = processes.start()
    try:
        on_ready(port)
        processes.watch(stop)
    finally:
        processes.stop()
