"""The headless runtime: one asyncio loop on its own thread that hosts every server and the tick.

`xswarm serve` runs it alone; the TUI runs the very same object in the background and only
consumes its bus and its ``snapshot``. Start order: database (migrated) and the feed recorder
-> system sampler -> scheduler tick -> bridge / supervisor servers -> webhook child processes
(never on this loop: ``_start_webhooks``) -> model load on
the inference thread (it may take minutes, so it never holds up the servers: calls are refused
with "model not ready" until it is done, and ``ModelStatusChanged`` events report progress) ->
node heartbeat.

Every bus event except high-rate samples lands in the ``events`` table through one recorder
subscribed here (the embedded webhooks server is told not to write its own rows, so nothing
is recorded twice). The recorder only queues the row for the database's writer thread, so
publishing from the tick never waits for a commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib.metadata
import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine import events, persona
from engine.calls import CallRegistry, CallSession
from engine.config import Settings
from engine.events import EventBus, ModelLoad
from engine.models import registry as models
from engine.models.base import VoiceModel
from engine.priority import BACKGROUND_NICE
from engine.scheduler import Scheduler
from engine.snapshot import ModelInfo, ModelState, NodeInfo, SlotInfo, Snapshot
from engine.store import calls as call_rows
from engine.store import feed, nodes, routing
from engine.store.db import Database, StoreError, log_if_failed
from engine.store.migrations import migrate
from engine.tasks import cancel_and_wait
from engine.telemetry.system import SystemSampler

if TYPE_CHECKING:
    from engine.bridge.server import BridgeServer
    from engine.storage.service import StorageService
    from engine.supervisor.server import SupervisorServer
    from webhooks.workers import WebhookProcesses

log = logging.getLogger("xswarm.runtime")
VERSION = importlib.metadata.version("xswarm")

RECENT_EVENTS = 50
SWITCH_INTERVAL_S = 0.001
CLOSE_CALLS_S = 5.0
"""How long shutdown waits for all live calls' streams to close, together."""
_QUIET_EVENTS = (events.LatencySampled, events.TickSampled, events.SystemSampled)
"""High-rate samples are not kept in the snapshot's recent-events list."""


class Runtime:
    """Owns the bus, the database, the model, the scheduler, the live calls and the servers."""

    def __init__(
        self,
        settings: Settings,
        *,
        model_spec: str | None = None,
        bridge_port: int | None = None,
        supervisor_port: int | None = None,
        webhooks_port: int | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus or EventBus()
        self.db: Database | None = None
        self.model: VoiceModel | None = None
        self.model_spec = model_spec or settings.model.name
        self.model_state: ModelState = "idle"
        self.model_detail = ""
        self.model_progress: float | None = None
        self.calls = CallRegistry(self.bus, on_start=self._call_live, on_end=self._call_ended)
        self.scheduler = Scheduler(self.calls, self.bus)
        self.node_id = settings.server.node_id or socket.gethostname()
        self.node_instance = nodes.new_instance()
        """This process's hold on ``node_id`` in the shared ``nodes`` table."""
        self.node_state = "ready"
        self._id_taken = False
        self._leaving = False
        """What the operator last asked of this node (``xswarm nodes drain|resume``), as read
        back with the last heartbeat."""
        self.started_at = time.time()
        self.loop = asyncio.new_event_loop()
        self._want = {
            "bridge": settings.server.bridge_port if bridge_port is None else bridge_port,
            "supervisor": settings.server.supervisor_port if supervisor_port is None else supervisor_port,
            "webhooks": (settings.server.webhooks_port if settings.server.webhooks_enabled else 0)
            if webhooks_port is None
            else webhooks_port,
        }
        self.bridge_port: int | None = None
        self.supervisor_port: int | None = None
        self.webhooks_port: int | None = None
        self.bridge: BridgeServer | None = None
        self.supervisor: SupervisorServer | None = None
        self.webhooks: WebhookProcesses | None = None
        self.storage: StorageService | None = None
        self.system_sampler = SystemSampler(self.bus.publish, settings.ui.poll_interval_s)
        """CPU, RAM and GPU as ``SystemSampled`` on the bus (the TUI and supervisors show them)."""
        self._unrecord: Callable[[], None] | None = None
        self._recent: deque[events.Event] = deque(maxlen=RECENT_EVENTS)
        self._unsubscribe = self.bus.subscribe(self._remember)
        self._thread: threading.Thread | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the database, start the loop thread and the servers; the model loads behind."""
        # The tick hands work between the loop thread and the inference thread twice per 80 ms;
        # with CPython's default 5 ms GIL switch interval each hand-off can wait that long
        # behind a busy loop. 1 ms keeps the hand-off short at a negligible switching cost.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.db = Database.from_settings(self.settings).start()
        try:
            migrate(self.db)
            # Before any server starts: a second process claiming a live node id stops here.
            try:
                self.node_state = self._heartbeat_future().result()
            except nodes.NodeIdTaken:
                if not nodes.release_if_dead(self.db, self.node_id):
                    raise
                log.info("node id %s was held by a process on this host that has died; taking it over", self.node_id)
                self.node_state = self._heartbeat_future().result()
        except StoreError:
            self.db.close()
            raise
        self._unrecord = self.bus.subscribe(self._record)
        self.system_sampler.start()
        self.scheduler.gc_pacer.install()
        self._thread = threading.Thread(target=self.loop.run_forever, name="xswarm-runtime", daemon=True)
        self._thread.start()
        try:
            self.call_soon(self._astart()).result(timeout=60)
            if self._want["webhooks"]:
                self._start_webhooks()
        except BaseException:
            self.stop()
            raise
        log.info(
            "runtime %s started: bridge %s, supervisor %s, webhooks %s",
            self.node_id,
            self.bridge_port,
            self.supervisor_port,
            self.webhooks_port,
        )

    def stop(self) -> None:
        """End live calls, stop the servers and the tick, flush and close the database."""
        if self._stopped:
            return
        self._stopped = True
        if self.webhooks is not None:
            self.webhooks.stop()  # first: no new call is admitted while the calls close
        if self._thread is not None and self._thread.is_alive():
            try:
                self.call_soon(self._astop()).result(timeout=20)
            except Exception:
                log.exception("runtime stop did not finish cleanly")
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.scheduler.shutdown()
        self.scheduler.gc_pacer.uninstall()
        self.system_sampler.stop()
        if self._unrecord is not None:
            self._unrecord()  # before the close: later events have nowhere to go
        if self.db is not None:
            self.db.close()
        self._unsubscribe()
        if not self.loop.is_running():
            self.loop.close()
        log.info("runtime %s stopped", self.node_id)

    def call_soon(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run a coroutine on the runtime loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _astart(self) -> None:
        host = self.settings.server.host
        self.scheduler.start()
        if self._want["bridge"]:
            from engine.bridge.server import BridgeServer

            self.bridge = BridgeServer(self)
            await self.bridge.start(host, self._want["bridge"])
            self.bridge_port = self.bridge.port
        if self._want["supervisor"]:
            from engine.supervisor.server import SupervisorServer

            self.supervisor = SupervisorServer(self)
            await self.supervisor.start(host, self._want["supervisor"])
            self.supervisor_port = self.supervisor.port
        from engine.storage.service import StorageService

        self.storage = StorageService(self)
        await self.storage.start()
        self._begin_model_load()
        self._heartbeat = self.loop.create_task(self._heartbeat_loop(), name="xswarm-heartbeat")

    def _start_webhooks(self) -> None:
        """The webhooks run in child processes (``webhooks.workers``), never on this process's
        loop: hostile HTTP must not share the voice tick's loop and GIL. Their events come back
        to this bus (our recorder writes them to the feed), their log lines to our log; a
        child that exits is restarted; they stop with the node."""
        from webhooks.limits import DEFAULT_RATE_LIMIT
        from webhooks.workers import WebhookProcesses, WorkerPlan

        server = self.settings.server
        plan = WorkerPlan(
            server.host,
            self._want["webhooks"],
            server.webhooks_workers,
            DEFAULT_RATE_LIMIT,
            settings=self.settings,
            nice=BACKGROUND_NICE,
        )
        self.webhooks = WebhookProcesses(plan, bus=self.bus)
        self.webhooks_port = self.webhooks.start()
        self.webhooks.watch_in_background(
            lambda exc: self.bus.publish(events.ErrorRaised(source="webhooks", message=str(exc)))
        )

    async def _astop(self) -> None:
        await cancel_and_wait(self._heartbeat)
        self._heartbeat = None
        self._leaving = True  # no heartbeat may write the row back from here on
        if self.db is not None:
            # Out of rotation first, so no new call is routed here while the live ones close
            # (their callers are re-routed to other nodes by the voice webhook).
            try:
                await asyncio.wrap_future(nodes.remove(self.db, self.node_id, self.node_instance))
            except StoreError:
                log.warning("could not remove node row %s", self.node_id)
        await self._close_calls("node shutting down")
        for server in (self.bridge, self.supervisor, self.storage):
            if server is not None:
                try:
                    await server.stop()
                except Exception:
                    log.exception("stopping %s failed", type(server).__name__)
        await self.scheduler.stop()

    async def _close_calls(self, reason: str) -> None:
        """Close every live call's stream at once (Twilio's fallback TwiML takes over), all
        under one CLOSE_CALLS_S: one slow socket must not make shutdown wait for it per call."""
        sessions = list(self.calls)
        if not sessions:
            return
        closing = asyncio.gather(*(s.transport.close(reason) for s in sessions), return_exceptions=True)
        try:
            results: list[Any] = await asyncio.wait_for(closing, CLOSE_CALLS_S)
        except TimeoutError:
            log.warning("closing %d live calls took over %.0f s; the rest were left open", len(sessions), CLOSE_CALLS_S)
            results = [None] * len(sessions)
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not close %s: %s", session.call_id, result)
            self.calls.finish(session, reason)

    # ----------------------------------------------------------------------- model

    def _begin_model_load(self) -> None:
        self._model_status("loading", f"resolving {self.model_spec}", model=self.model_spec, progress=0.0)
        future = self.scheduler.executor.submit(self._load_model)
        future.add_done_callback(lambda f: self.loop.call_soon_threadsafe(self._model_loaded, f))

    def _load_model(self) -> VoiceModel:
        """Runs on the inference thread: resolve, build, load, warm up; auto falls back to echo."""
        spec = self.model_spec
        fallback_reason = None
        if spec == "auto":
            choice = models.resolve("auto", self.settings)
            spec = choice.spec
            if spec == "echo":
                fallback_reason = choice.reason
        else:
            models.resolve(spec, self.settings)  # raises ModelSpecError for unknown names
        slots = self.settings.model.slots or None
        try:
            model = models.create(spec, self.settings, slots)
            self._model_status("loading", f"loading {spec}", model=spec, progress=0.0)
            model.load(lambda fraction, what: self._model_status("loading", what, model=spec, progress=fraction))
            self._model_status("warming", f"warming up {spec}", model=spec)
            model.warmup()
        except Exception as exc:
            if self.model_spec != "auto" or spec == "echo":
                raise
            log.exception("loading %s failed; falling back to echo", spec)
            fallback_reason = f"{spec} failed to load ({exc}); serving the echo model"
            model = models.create("echo", self.settings, slots)
        if fallback_reason:
            self._model_status("fallback", fallback_reason, model="echo")
        return model

    def _model_loaded(self, future: concurrent.futures.Future[VoiceModel]) -> None:
        try:
            model = future.result()
        except Exception as exc:
            log.error("model %s failed to load: %s", self.model_spec, exc)
            self._model_status("failed", str(exc), model=self.model_spec)
            return
        self.scheduler.attach(model)
        self.model = model
        # Everything built so far (modules, settings, the model's Python objects) lives as long
        # as the process: move it out of the collector's reach so full collections during calls
        # scan only call-time objects (a gen-2 pass over a loaded model stalls the tick).
        gc.freeze()
        facts = model.describe()
        precision = "".join(f", {k.replace('_', ' ')} {facts[k]}" for k in ("weights", "kv_cache") if facts.get(k))
        self._model_status("ready", f"{model.name}: {model.slots} slots{precision}", model=model.name, progress=1.0)
        self._beat()

    def _model_status(self, state: ModelLoad, detail: str, *, model: str, progress: float | None = None) -> None:
        self.model_state, self.model_detail, self.model_progress = state, detail, progress
        if state in ("ready", "failed", "fallback"):
            log.info("model %s: %s (%s)", model, state, detail)
        self.bus.publish(events.ModelStatusChanged(model=model, state=state, detail=detail, progress=progress))

    # ------------------------------------------------------------------ heartbeat

    @property
    def bridge_url(self) -> str | None:
        """What the voice webhook puts in TwiML (``<base>/twilio``)."""
        if self.settings.server.bridge_public_url:
            return self.settings.server.bridge_public_url.rstrip("/")
        if self.bridge_port:
            return f"ws://{self.settings.server.host}:{self.bridge_port}"
        return None

    @property
    def supervisor_url(self) -> str | None:
        """Where a fleet console reaches this node's supervisor socket."""
        if self.settings.server.supervisor_public_url:
            return self.settings.server.supervisor_public_url
        if self.supervisor_port:
            return f"ws://{self.settings.server.host}:{self.supervisor_port}"
        return None

    def _heartbeat_future(self) -> concurrent.futures.Future[Any]:
        assert self.db is not None
        return nodes.heartbeat(
            self.db,
            self.node_id,
            bridge_url=self.bridge_url if self.bridge_port else None,
            supervisor_url=self.supervisor_url,
            model=self.model.name if self.model else self.model_spec,
            version=VERSION,
            slots_total=self.calls.capacity,
            slots_free=self.calls.available,
            live_calls=self.calls.used,
            step_ms_p99=self.scheduler.model_step_ms.percentile(99),
            started_at=int(self.started_at * 1000),
            instance=self.node_instance,
        )

    def _beat(self, connected: str | None = None) -> None:
        """Write this node's row now (runtime loop). ``connected``: a call that just went live
        here; its routing reservation ends in the same queue order as the row that counts it."""
        if self.db is None or self._leaving:
            return
        try:
            future = self._heartbeat_future()
            if connected is not None:
                self.db.submit(*routing.release_statement(connected)).add_done_callback(
                    log_if_failed("routing reservation", log)
                )
        except StoreError as exc:  # the database is closing
            log.warning("heartbeat not written: %s", exc)
            return
        future.add_done_callback(self._beaten_threadsafe)

    def _beaten_threadsafe(self, future: concurrent.futures.Future[Any]) -> None:
        """Writer thread: hand the outcome to the loop (unless the runtime has stopped)."""
        try:
            self.loop.call_soon_threadsafe(self._beaten, future)
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass

    def _beaten(self, future: concurrent.futures.Future[Any]) -> None:
        """The operator's state came back with the heartbeat: apply a change and say so."""
        exc = future.exception()
        if exc is not None:
            log.warning("heartbeat write failed: %s", exc)
            if isinstance(exc, nodes.NodeIdTaken) and not self._id_taken:
                self._id_taken = True  # said once, not every heartbeat
                self.bus.publish(events.ErrorRaised(source="node", message=str(exc)))
            return
        self._id_taken = False
        state = future.result()
        if state == self.node_state:
            return
        self.node_state = state
        if state == "draining":
            detail = f"takes no new calls; {self.calls.used} live calls finish"
        else:
            detail = "takes new calls again"
        log.info("node %s %s: %s", self.node_id, state, detail)
        self.bus.publish(events.NodeStateChanged(node_id=self.node_id, state=state, detail=detail))

    async def set_node_state(self, state: str) -> None:
        """Drain (``"draining"``) or resume (``"ready"``) this node from its own supervisor
        socket: the same row ``xswarm nodes drain|resume`` writes, then a heartbeat at once so
        the change shows now (``NodeStateChanged``) rather than at the next beat."""
        if self.db is None:
            raise StoreError("no database is open in this runtime")
        await asyncio.wrap_future(self.db.submit("UPDATE nodes SET state = ? WHERE id = ?", (state, self.node_id)))
        self._beat()

    async def _heartbeat_loop(self) -> None:
        while True:
            self._beat()
            if self.db is not None:
                self.db.submit(*routing.expired_statement()).add_done_callback(
                    log_if_failed("expired reservations", log)
                )
            await asyncio.sleep(nodes.HEARTBEAT_S)

    # ------------------------------------------------------------------ call rows

    def _call_live(self, session: CallSession) -> None:
        if self.settings.telephony.greet:
            persona.greet(session, self.settings.ui.theme)
        if self.db is None:
            return
        self._beat(connected=session.call_id)  # routing sees the taken slot now, not in 5 s
        call_rows.record_live(
            self.db,
            call_id=session.call_id,
            stream_sid=session.stream_sid,
            user_id=session.user_id,
            caller=session.caller,
            source=session.source,
            node_id=self.node_id,
            slot=session.slot,
            theme=session.theme,
            started_at=session.started_at,
        ).add_done_callback(log_if_failed("call start row", log))

    def _call_ended(self, session: CallSession, reason: str) -> None:
        if self.db is None:
            return
        self._beat()
        summary = session.summary()
        call_rows.record_end(
            self.db,
            call_id=session.call_id,
            reason=reason,
            step_p50_ms=self.scheduler.model_step_ms.percentile(50),
            **summary,
        ).add_done_callback(log_if_failed("call end row", log))

    # ---------------------------------------------------------------- local calls

    async def start_local_call(self, sd: Any | None = None) -> str:
        """Talk to the model through this machine's sound card (runtime loop); returns the
        call id. Raises ``LocalAudioError`` (a ``CallControlError``) when there is no device."""
        from engine.bridge.local_audio import LocalAudioCall

        session = await LocalAudioCall(self, sd).open()
        return session.call_id

    # -------------------------------------------------------------------- snapshot

    def _record(self, event: events.Event) -> None:
        """Bus subscriber: queue the event's feed row (never waits for the database)."""
        if self.db is None or not feed.keeps(event):
            return
        try:
            feed.append_event(self.db, event).add_done_callback(log_if_failed("feed row", log))
        except StoreError as exc:  # the database is closing: the event stays on the bus only
            log.warning("feed row for %s not written: %s", type(event).__name__, exc)

    def _remember(self, event: events.Event) -> None:
        if isinstance(event, _QUIET_EVENTS):
            return
        self._recent.append(event)
        if isinstance(event, events.CallRefused) and event.reason == "no_headroom" and not self.loop.is_closed():
            # advertise 0 free slots now rather than at the next beat, so routing moves on
            self.loop.call_soon_threadsafe(self._beat)

    def snapshot(self, *, mask_callers: bool = False) -> dict[str, Any]:
        """Everything a status page needs: the wire form of an ``engine.snapshot.Snapshot``.
        ``mask_callers`` masks callers' numbers (live calls and recent events), for read-only
        supervisors."""
        mask: Any = feed.masked_wire if mask_callers else (lambda wire: wire)
        snap = Snapshot(
            node=NodeInfo(
                id=self.node_id,
                started_at=self.started_at,
                uptime_s=round(time.time() - self.started_at, 1),
                bridge_port=self.bridge_port,
                supervisor_port=self.supervisor_port,
                webhooks_port=self.webhooks_port,
                bridge_url=self.bridge_url,
                supervisor_url=self.supervisor_url,
                state=self.node_state,
                version=VERSION,
            ),
            model=ModelInfo(
                spec=self.model_spec,
                name=self.model.name if self.model else None,
                state=self.model_state,
                detail=self.model_detail,
                progress=self.model_progress,
                facts=self.model.describe() if self.model else None,
            ),
            slots=SlotInfo(
                total=self.calls.capacity,
                used=self.calls.used,
                free=self.calls.free,
                available=self.calls.available,
                no_headroom=self.scheduler.headroom(),
            ),
            calls=[s.live() for s in self.calls],
            recent_events=[e.to_wire() for e in list(self._recent)],
            scheduler=self.scheduler.describe(),
            bridge=self.bridge.describe() if self.bridge is not None else None,
            storage=self.storage.status() if self.storage is not None else None,
        ).to_wire()
        snap["calls"] = [mask(call) for call in snap["calls"]]
        snap["recent_events"] = [mask(event) for event in snap["recent_events"]]
        return snap
