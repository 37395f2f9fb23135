"""Supervisor server (:9999): the authenticated live feed, listen, whisper, takeover, metrics.

One ``websockets`` server on the runtime loop serves four things on one port:
``GET /health`` and ``GET /metrics`` (answered in ``process_request`` before any upgrade), the
browser dashboard (``GET /`` without an upgrade, and ``/static/…``: engine/supervisor/dashboard.py)
and the WebSocket on ``/`` (protocol v1, engine/supervisor/protocol.py,
docs/supervisor-protocol.md), whose upgrade must come from an allowed ``Origin``
(engine/supervisor/origin.py).

Why the fan-out looks the way it does: the scheduler publishes on the bus every 80 ms, and a
supervisor on a slow link must never make a call late. So the bus subscriber only hands the
event to the loop; each event is serialised once; every client has its own bounded queues and
its own writer task. Samples (latency, tick, system figures) are coalesced per key so an
unsent one is replaced by the newer one; audio keeps only the newest frames; events and
answers are kept in order up to a limit past which the client is disconnected (4408) —
each drop and disconnect is counted in /metrics.

Commands go to ``engine.control.CallControl``, the same code the embedded TUI uses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engine.calls import CallControlError
from engine.control import CallControl, ControlHost
from engine.events import (
    CallEnded,
    Event,
    LatencySampled,
    Listen,
    SystemSampled,
    TickSampled,
    Unlisten,
)
from engine.http_answers import json_response, with_body
from engine.ratelimit import RateLimit, TokenBucket
from engine.store import feed
from engine.supervisor import origin
from engine.supervisor import protocol as p
from engine.supervisor.auth import (
    AuthConfigError,
    Authenticator,
    Refusal,
    Role,
    bearer,
    fingerprint,
    load_tokens,
    token_file,
)
from engine.supervisor.dashboard import StaticFiles, is_upgrade
from engine.supervisor.tokens import TokenWatch
from engine.tasks import cancel_and_wait

if TYPE_CHECKING:
    from engine.models.base import VoiceModel
    from engine.telemetry.metrics import Metrics

log = logging.getLogger("xswarm.supervisor")

AUTH_TIMEOUT_S = 2.0
TOKEN_POLL_S = 1.0
"""How often the token file is looked at (a stat): a rotation takes effect within this."""
SAMPLE_INTERVAL_S = 0.25
"""Latency samples leave the server at most 4 times a second per call."""
MAX_QUEUED_EVENTS = 2000
"""Events and answers waiting for one client; past this it is too slow and is disconnected."""
MAX_QUEUED_AUDIO = 12
"""Audio frames waiting for one client (about 0.5 s of both directions); older ones are dropped:
late audio is worth less than live audio."""
SEND_STALL_S = 10.0
"""A client whose socket accepted nothing for this long is disconnected."""
MAX_CLIENTS = 100
COMMAND_LIMIT = RateLimit(rate=20.0, burst=40.0)
"""Commands per second a client may sustain, and its burst: every command is an audit row,
so a runaway script must not turn into a database flood."""
SEND_BUFFER_BYTES = 64 * 1024
"""Kernel send buffer per supervisor socket. Left to autotuning it grows to megabytes, which for
a client that stalls would hold tens of seconds of stale audio out of our queues' reach; kept
small, back-pressure reaches the per-client queues, where old audio is dropped first."""
ERROR_INTERVAL_S = 1.0
"""Errors about a client's audio frames are answered at most this often (12.5 frames a second
of bad audio must not become 12.5 error messages)."""
_NAME = re.compile(r"[^A-Za-z0-9_.@+-]")
_SAMPLES = (LatencySampled, TickSampled, SystemSampled)


@dataclass(eq=False)
class _SharedStream:
    """One (call, direction, codec) audio stream as it leaves the server, shared by every client
    listening to it: each frame is encoded (PCM16 or Opus) and stamped once, on the runtime
    loop inside the tick, however many listen; all of them get the very same bytes. ``seq``
    counts the stream's frames, so a client that joins a stream already flowing starts
    mid-count (and mid-Ogg-stream for Opus, which ``sphn``'s reader decodes from any page)."""

    stream: p.AudioStream
    listeners: set[_Listen] = field(default_factory=set)
    last_pcm: np.ndarray | None = None
    last_frame: bytes = b""

    def pack(self, pcm: np.ndarray) -> tuple[bytes, bool]:
        """The frame for ``pcm`` and whether it was encoded just now: the first listener's tap
        of a tick encodes, the others of that tick reuse it (the scheduler hands every tap of
        a call the same array in one tick). The caller calls ``forget`` once the tick is over,
        so the next tick's frame is encoded even if it comes in the same array."""
        if pcm is self.last_pcm:
            return self.last_frame, False
        self.last_frame = self.stream.pack(pcm)
        self.last_pcm = pcm
        return self.last_frame, True

    def forget(self) -> None:
        self.last_pcm = None


@dataclass(eq=False)
class _Listen:
    """One listened call for one client: its codec and the shared stream of each direction."""

    codec: str
    streams: dict[str, _SharedStream] = field(default_factory=dict)


@dataclass(eq=False)
class _Client:
    """A connected, authenticated supervisor and its outgoing queues."""

    ws: ServerConnection
    actor: str
    role: Role
    address: str
    token_id: str = ""
    """Fingerprint of the token it logged in with: retiring that token closes this client."""
    events: deque[str] = field(default_factory=deque)
    samples: dict[tuple[str, str], str] = field(default_factory=dict)
    audio: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_QUEUED_AUDIO))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    listens: dict[str, _Listen] = field(default_factory=dict)
    decoders: dict[str, p.OpusDecoder] = field(default_factory=dict)
    last_error_at: float = 0.0
    closing: bool = False
    commands: TokenBucket = field(default_factory=lambda: TokenBucket(COMMAND_LIMIT))
    """Commands this client may send (``COMMAND_LIMIT``)."""


class SupervisorHost(ControlHost, Protocol):
    """What the supervisor server uses of the runtime: what call control uses, and the rest
    below (which covers the metrics' ``MetricsHost``)."""

    @property
    def model(self) -> VoiceModel | None: ...
    @property
    def model_spec(self) -> str: ...
    @property
    def node_state(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    def snapshot(self, *, mask_callers: bool = False) -> dict[str, Any]: ...


class SupervisorServer:
    """The supervisor WebSocket, /health and /metrics of one runtime."""

    def __init__(self, runtime: SupervisorHost) -> None:
        self.runtime = runtime
        self.control = CallControl(runtime)
        self.port: int | None = None
        self.metrics: Metrics | None = None
        self._server: Server | None = None
        self._auth: Authenticator | None = None
        self._static: StaticFiles | None = None
        self._origins: frozenset[str] = frozenset()
        self._clients: set[_Client] = set()
        self._header_roles: weakref.WeakKeyDictionary[ServerConnection, tuple[Role, str, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._token_task: asyncio.Task[None] | None = None
        self._numbers = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._unsubscribe: Callable[[], None] | None = None
        self._last_system: SystemSampled | None = None
        """The newest CPU/RAM/GPU figures (the runtime's sampler publishes them on the bus)."""
        self._sample_sent: dict[str, float] = {}
        self._sample_pending: dict[str, LatencySampled] = {}
        self._sample_timers: dict[str, asyncio.TimerHandle] = {}
        self._streams: dict[tuple[str, str, str], _SharedStream] = {}
        """(call_id, direction, codec) -> the audio stream every listener of it shares."""

    # ------------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int) -> None:
        from engine.telemetry.metrics import Metrics

        self._auth = Authenticator(load_tokens(self.runtime.settings))
        self._token_watch = TokenWatch(token_file())
        self._static = StaticFiles.load()
        self._origins = frozenset(self.runtime.settings.supervisor.allowed_origins)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.metrics = Metrics(self.runtime, supervisor=self)
        try:
            self._server = await serve(
                self._handle,
                host,
                port,
                process_request=self._process_request,
                compression=None,  # deflate costs CPU per client per message; events are small
                max_size=p.MAX_FRAME_BYTES,
                max_queue=32,
                ping_interval=10,
                ping_timeout=10,
                close_timeout=2,
                server_header=None,
            )
        except OSError:  # port taken: leave nothing subscribed behind
            self.metrics.close()
            raise
        self._unsubscribe = self.runtime.bus.subscribe(self._on_bus)
        self._token_task = asyncio.create_task(self._watch_tokens(), name="xswarm-supervisor-tokens")
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("supervisor listening on %s:%s", host, self.port)

    async def stop(self) -> None:
        await cancel_and_wait(self._token_task)
        self._token_task = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for timer in self._sample_timers.values():
            timer.cancel()
        self._sample_timers.clear()
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None
        if self.metrics is not None:
            self.metrics.close()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # ------------------------------------------------------------------------ HTTP side

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/health":
            return json_response(conn, 200, self._health())
        if path == "/metrics":
            assert self.metrics is not None
            body, content_type = self.metrics.render()
            response = conn.respond(200, "")
            return with_body(response, body, content_type)
        if not is_upgrade(request):
            assert self._static is not None
            page = self._static.response(request)
            if page is not None:
                return page
        if path != "/":
            return conn.respond(404, "not found: the dashboard and the socket are at /, plus /health and /metrics\n")
        if not origin.allowed(request.headers.get("Origin"), request.headers.get("Host"), self._origins):
            log.warning("supervisor upgrade from origin %r refused", request.headers.get("Origin"))
            return conn.respond(403, "this page's origin may not open the supervisor socket\n")
        if len(self._clients) >= MAX_CLIENTS:
            return conn.respond(503, "too many supervisors connected\n")
        address = _address(conn)
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            return None  # the client may still authenticate with its first message
        role, refused = self._check(address, token)
        if role is None:
            blocked = refused == "rate_limited"
            return conn.respond(429 if blocked else 401, "too many failed attempts\n" if blocked else "invalid token\n")
        self._header_roles[conn] = (role, _name(request.headers.get("X-Xswarm-Name")) or role, fingerprint(token))
        return None

    def _health(self) -> dict[str, Any]:
        model = self.runtime.model
        return {
            "status": "ok",
            "node": self.runtime.node_id,
            "model": model.name if model is not None else None,
            "calls": len(self.runtime.calls),
            "supervisors": len(self._clients),
            "uptime_s": round(time.time() - self.runtime.started_at, 1),
        }

    def _check(self, address: str, token: str | None) -> tuple[Role | None, Refusal | None]:
        """Role for a token, counting (and auditing) failures; ``(None, why)`` when refused."""
        assert self._auth is not None
        role, refused = self._auth.check(address, token)
        if refused is not None:
            if self.metrics is not None:
                self.metrics.auth_failures.labels(reason=refused).inc()
            if refused != "rate_limited":  # the rate limit is there to bound these rows
                self._audit_login(address, None, f"error: {refused.replace('_', ' ')}")
                log.warning("supervisor login from %s refused: %s", address, refused)
        return role, refused

    def _audit_login(self, address: str, actor: str | None, result: str, role: str | None = None) -> None:
        db = self.runtime.db
        if db is None:
            return
        from engine.store import audit

        future = audit.record(
            db, actor=actor or address, role=role, action="connect", detail={"address": address}, result=result
        )
        future.add_done_callback(audit.log_failure)

    # ------------------------------------------------------------------- socket handler

    async def _handle(self, ws: ServerConnection) -> None:
        address = _address(ws)
        sock = ws.transport.get_extra_info("socket") if ws.transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        held = self._header_roles.pop(ws, None)
        if held is None:
            held = await self._first_message_auth(ws, address)
            if held is None:
                return
        role, name, token_id = held
        if self._last_system is None:  # the runtime's sampler has not published yet
            await self._take_system_sample()  # the snapshot carries CPU, RAM and GPU from the start
        actor = f"{name}#{next(self._numbers)}"
        client = _Client(ws, actor, role, address, token_id)
        self._audit_login(address, actor, "ok", role)
        log.info("supervisor %s (%s) connected from %s", actor, role, address)
        # Snapshot and registration in one synchronous step: no event can fall between them.
        client.events.append(self._snapshot(client))
        self._clients.add(client)
        client.wake.set()
        writer = asyncio.get_running_loop().create_task(self._writer(client), name=f"supervisor-writer-{actor}")
        try:
            async for message in ws:
                if isinstance(message, str):
                    await self._on_text(client, message)
                else:
                    self._on_audio(client, message)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            client.closing = True
            for state in client.listens.values():
                self._leave(state)
            writer.cancel()
            await self.control.release(actor, role, "supervisor socket closed")
            log.info("supervisor %s disconnected (%s)", actor, ws.close_code)

    async def _first_message_auth(self, ws: ServerConnection, address: str) -> tuple[Role, str, str] | None:
        """No Authorization header: the first message must be ``auth`` within 2 s."""
        reason = "missing token"
        try:
            raw = await asyncio.wait_for(ws.recv(), AUTH_TIMEOUT_S)
            request = p.parse_request(raw)
            if request.type == p.AUTH:
                token = request.body.get("token") if request.body else None
                role, refused = self._check(address, token if isinstance(token, str) else None)
                if role is not None:
                    return role, _name((request.body or {}).get("name")) or role, fingerprint(str(token))
                reason = "rate limited" if refused == "rate_limited" else "invalid token"
            else:
                self._check(address, None)
        except TimeoutError:
            self._check(address, None)
            reason = "no auth message within 2 s"
        except p.ProtocolError:
            self._check(address, None)
        except ConnectionClosed:
            return None
        code = p.CLOSE_RATE_LIMITED if reason == "rate limited" else p.CLOSE_UNAUTHORIZED
        await ws.close(code, reason)
        return None

    async def _watch_tokens(self) -> None:
        """Take a rotated token file into use and close the consoles of retired tokens."""
        while True:
            await asyncio.sleep(TOKEN_POLL_S)
            if not self._token_watch.changed():
                continue
            try:
                tokens = await asyncio.to_thread(load_tokens, self.runtime.settings)
            except AuthConfigError as exc:
                log.error("supervisor tokens not reloaded, the old ones stay valid: %s", exc)
                continue
            assert self._auth is not None
            self._auth.replace(tokens)
            log.info(
                "supervisor tokens reloaded: %s",
                ", ".join(f"{len(tokens.valid(role))} {role}" for role in ("operator", "monitor")),
            )
            retired = [c for c in self._clients if c.token_id not in self._auth.fingerprints[c.role]]
            for client in retired:
                log.info("closing supervisor %s: its token %s was retired", client.actor, client.token_id)
                self._audit_login(client.address, client.actor, "closed: token retired", client.role)
            await asyncio.gather(
                *(c.ws.close(p.CLOSE_UNAUTHORIZED, "token retired") for c in retired), return_exceptions=True
            )

    def _snapshot(self, client: _Client) -> str:
        try:
            state = dict(self.runtime.snapshot(mask_callers=client.role != "operator"))
        except Exception as exc:  # a half-started runtime still lets the supervisor in
            log.exception("runtime snapshot failed")
            state = {"error": f"snapshot incomplete: {exc}"}
        state.update(
            v=p.VERSION,
            type=p.SNAPSHOT,
            id=None,
            you={"actor": client.actor, "role": client.role},
            server_time=time.time(),
            opus=p.opus_available(),
        )
        state.setdefault("system", self._last_system.to_wire() if self._last_system else None)
        return p.encode(state)

    # --------------------------------------------------------------------- client input

    async def _on_text(self, client: _Client, text: str) -> None:
        try:
            request = p.parse_request(text)
        except p.ProtocolError as exc:
            self._push_event(client, p.error_frame(getattr(exc, "id", None), str(exc), code="bad_request"))
            return
        if request.type == p.PING:
            self._push_event(
                client, p.encode({"v": p.VERSION, "type": p.PONG, "id": request.id, "server_time": time.time()})
            )
            return
        if request.type == p.AUTH:
            self._push_event(client, p.error_frame(request.id, "already authenticated", code="bad_request"))
            return
        command = request.command
        assert command is not None
        if not client.commands.take():
            self._push_event(
                client,
                p.error_frame(
                    request.id,
                    f"more than {COMMAND_LIMIT.rate:.0f} commands a second",
                    code="rate_limited",
                    type_of=request.type,
                ),
            )
            return
        tap = None
        if isinstance(command, Listen):
            codec = (request.body or {}).get("codec", "pcm16")
            if codec not in p.CODECS:
                self._push_event(
                    client, p.error_frame(request.id, f"codec must be one of {', '.join(p.CODECS)}", code="bad_request")
                )
                return
            if codec == "opus" and not p.opus_available():
                self._push_event(
                    client, p.error_frame(request.id, "opus needs sphn on the server; use pcm16", code="unavailable")
                )
                return
            state = _Listen(codec)
            tap = self._make_tap(client, command.call_id, state)
        answer = await self.control.execute(command, client.actor, client.role, tap=tap)
        if answer.pop("ok"):
            if isinstance(command, Listen):
                previous = client.listens.get(command.call_id)
                if previous is not None:  # a second listen replaced the first one's tap
                    self._leave(previous)
                client.listens[command.call_id] = state
            elif isinstance(command, Unlisten):
                self._leave(client.listens.pop(command.call_id, None))
            self._push_event(client, p.ok_frame(request.id, type_of=request.type, **answer))
        else:
            self._push_event(client, p.error_frame(request.id, answer.pop("error"), type_of=request.type, **answer))

    def _on_audio(self, client: _Client, data: bytes) -> None:
        """Operator audio for a call this client has taken over."""
        try:
            frame = p.AudioFrame.unpack(data)
            if frame.direction != "operator":
                raise p.ProtocolError("clients may only send operator audio")
            if client.role != "operator" or not self.control.holds(client.actor, frame.call_id):
                raise p.ProtocolError(f"take over {frame.call_id} before sending audio to it")
            call = self.runtime.calls.get(frame.call_id)
            if call is None:
                raise p.ProtocolError(f"no live call {frame.call_id}")
            if frame.codec == "pcm16":
                pcm = p.pcm16_to_float(frame.payload)
            else:
                decoder = client.decoders.get(frame.call_id)
                if decoder is None:
                    if not p.opus_available():
                        raise p.ProtocolError("opus needs sphn on the server; send pcm16")
                    decoder = client.decoders[frame.call_id] = p.OpusDecoder()
                pcm = decoder.decode(frame.payload)
                if len(pcm) > p.MAX_AUDIO_SAMPLES:
                    raise p.ProtocolError("decoded Opus frame is over one second")
            if len(pcm):
                try:
                    call.feed_operator_audio(pcm)
                except CallControlError as exc:  # the call ended between the lookup and now
                    raise p.ProtocolError(str(exc)) from None
        except p.ProtocolError as exc:
            now = time.monotonic()
            if now - client.last_error_at >= ERROR_INTERVAL_S:
                client.last_error_at = now
                self._push_event(client, p.error_frame(None, str(exc), code="bad_audio"))

    def _make_tap(self, client: _Client, call_id: str, state: _Listen) -> Callable[[str, np.ndarray], None]:
        """The function ``CallSession`` calls with each 80 ms frame of both directions. It
        takes the frame's bytes from the stream shared by every listener of that call,
        direction and codec (encoded once per frame) and hands them to this client's queue."""
        loop = self._loop
        assert loop is not None

        def tap(direction: str, pcm: np.ndarray) -> None:
            if client.closing:
                return
            shared = state.streams.get(direction)
            if shared is None:
                shared = state.streams[direction] = self._join(call_id, direction, state)
            data, fresh = shared.pack(pcm)
            if threading.get_ident() == self._loop_thread:
                if fresh:
                    loop.call_soon(shared.forget)  # runs after this tick's taps, before the next
                self._push_audio(client, data)
            else:
                if fresh:
                    loop.call_soon_threadsafe(shared.forget)
                loop.call_soon_threadsafe(self._push_audio, client, data)

        return tap

    def _join(self, call_id: str, direction: str, state: _Listen) -> _SharedStream:
        key = (call_id, direction, state.codec)
        shared = self._streams.get(key)
        if shared is None:
            shared = self._streams[key] = _SharedStream(p.AudioStream(call_id, direction, state.codec))
        shared.listeners.add(state)
        return shared

    def _leave(self, state: _Listen | None) -> None:
        """A listen ended: the last listener of a stream takes it away (a later one starts
        a fresh stream from seq 0)."""
        if state is None:
            return
        for shared in state.streams.values():
            shared.listeners.discard(state)
            stream = shared.stream
            key = (stream.call_id, stream.direction, stream.codec)
            if not shared.listeners and self._streams.get(key) is shared:
                del self._streams[key]
        state.streams.clear()

    async def _take_system_sample(self) -> None:
        """One sample for a first snapshot (NVML and /proc reads block for milliseconds, so on
        a worker thread); from then on the runtime's sampler keeps ``_last_system`` fresh."""
        from engine.telemetry import system

        try:
            sample = await asyncio.get_running_loop().run_in_executor(None, system.sample)
        except Exception:
            log.exception("system sample failed")
            return
        if self._last_system is None:  # a bus sample that arrived meanwhile is newer
            self._last_system = sample

    # ------------------------------------------------------------------------- fan-out

    def _on_bus(self, event: Event) -> None:
        """Bus subscriber: may run on any thread, so it only hands the event to the loop."""
        if threading.get_ident() == self._loop_thread:
            self._dispatch(event)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, event)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, SystemSampled):
            self._last_system = event
        elif isinstance(event, LatencySampled):
            if not self._due(event):
                return
        elif isinstance(event, CallEnded):
            self._forget_call(event.call_id)
        if not self._clients:
            return
        wire = event.to_wire()
        frame = p.encode(wire)
        if isinstance(event, _SAMPLES):
            key = (type(event).__name__, getattr(event, "call_id", ""))
            for client in self._clients:
                self._push_sample(client, key, frame)
        else:
            masked = feed.masked_wire(wire)  # monitors never see a caller's full number
            monitor_frame = frame if masked is wire else p.encode(masked)
            for client in self._clients:
                self._push_event(client, frame if client.role == "operator" else monitor_frame)

    def _due(self, event: LatencySampled) -> bool:
        """Coalesce latency samples to ≤ 4 Hz per call: send now when the last one left long
        enough ago, else keep the newest and send it when its turn comes."""
        now = time.monotonic()
        last = self._sample_sent.get(event.call_id)
        if last is None or now - last >= SAMPLE_INTERVAL_S:
            self._sample_sent[event.call_id] = now
            return True
        self._sample_pending[event.call_id] = event
        if event.call_id not in self._sample_timers and self._loop is not None:
            self._sample_timers[event.call_id] = self._loop.call_later(
                last + SAMPLE_INTERVAL_S - now, self._flush_sample, event.call_id
            )
        return False

    def _flush_sample(self, call_id: str) -> None:
        self._sample_timers.pop(call_id, None)
        event = self._sample_pending.pop(call_id, None)
        if event is not None:
            self._sample_sent[call_id] = time.monotonic()
            self._dispatch_sample(event)

    def _dispatch_sample(self, event: LatencySampled) -> None:
        frame = p.event_frame(event)
        for client in self._clients:
            self._push_sample(client, ("LatencySampled", event.call_id), frame)

    def _forget_call(self, call_id: str) -> None:
        self._sample_sent.pop(call_id, None)
        self._sample_pending.pop(call_id, None)
        timer = self._sample_timers.pop(call_id, None)
        if timer is not None:
            timer.cancel()
        for client in self._clients:
            self._leave(client.listens.pop(call_id, None))
            client.decoders.pop(call_id, None)
        for key in [k for k in self._streams if k[0] == call_id]:
            del self._streams[key]

    # ------------------------------------------------------------------ per-client queues

    def _push_event(self, client: _Client, frame: str) -> None:
        if client.closing:
            return
        if len(client.events) >= MAX_QUEUED_EVENTS:
            self._drop_client(client, "event queue overflowed")
            return
        client.events.append(frame)
        client.wake.set()

    def _push_sample(self, client: _Client, key: tuple[str, str], frame: str) -> None:
        if client.closing:
            return
        if key in client.samples:
            del client.samples[key]  # the older unsent sample is superseded: drop it
            self._count_drop("sample")
        client.samples[key] = frame
        client.wake.set()

    def _push_audio(self, client: _Client, data: bytes) -> None:
        if client.closing:
            return
        if len(client.audio) == MAX_QUEUED_AUDIO:
            self._count_drop("audio")  # deque(maxlen) drops the oldest frame
        client.audio.append(data)
        client.wake.set()

    def _count_drop(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped.labels(kind=kind).inc()

    def _drop_client(self, client: _Client, why: str) -> None:
        """Disconnect a client that cannot keep up (its hand-back happens in its handler)."""
        if client.closing:
            return
        client.closing = True
        client.events.clear()
        client.samples.clear()
        client.audio.clear()
        if self.metrics is not None:
            self.metrics.slow_disconnects.inc()
        log.warning("disconnecting slow supervisor %s: %s", client.actor, why)
        asyncio.get_running_loop().create_task(self._close_slow(client))

    @staticmethod
    async def _close_slow(client: _Client) -> None:
        try:
            await asyncio.wait_for(client.ws.close(p.CLOSE_TOO_SLOW, "too slow: queue overflowed"), 3.0)
        except Exception:
            pass
        if client.ws.transport is not None:
            client.ws.transport.abort()

    async def _writer(self, client: _Client) -> None:
        """Send the client's queues: answers and events first, then audio, then samples."""
        ws = client.ws
        try:
            while not client.closing:
                await client.wake.wait()
                client.wake.clear()
                while not client.closing:
                    if client.events:
                        message: str | bytes = client.events.popleft()
                    elif client.audio:
                        message = client.audio.popleft()
                    elif client.samples:
                        key = next(iter(client.samples))
                        message = client.samples.pop(key)
                    else:
                        break
                    try:
                        async with asyncio.timeout(SEND_STALL_S):
                            await ws.send(message)
                    except TimeoutError:
                        self._drop_client(client, f"nothing sent for {SEND_STALL_S:.0f} s")
                        return
        except ConnectionClosed:
            pass


# ---------------------------------------------------------------------------------- helpers


def _address(conn: ServerConnection) -> str:
    remote = conn.remote_address
    return str(remote[0]) if remote else "unknown"


def _name(value: Any) -> str | None:
    """A display name a client offers for itself, cleaned for logs and the audit table."""
    if not isinstance(value, str):
        return None
    cleaned = _NAME.sub("", value)[:40]
    return cleaned or None
