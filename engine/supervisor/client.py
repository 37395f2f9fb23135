"""Client library for the supervisor socket: what ``xswarm attach``, the TUI and tests use.

Why a library and not raw websockets at each caller: reconnecting with backoff, starting again
from a fresh snapshot, matching answers to commands by id, re-listening after a reconnect and
decoding audio frames are the same everywhere and easy to get subtly wrong.

Usage::

    async with SupervisorClient("ws://127.0.0.1:9999/", token, name="alice") as sup:
        snapshot = await sup.wait_snapshot()
        await sup.command(TakeOver(call_id))           # raises CommandError on an error answer
        await sup.send_audio(call_id, pcm_float32_24k)
        async for message in sup.messages():             # Snapshot after each (re)connect, then events
            ...

Everything runs on the caller's event loop. A takeover is never taken again automatically after
a reconnect (the server handed it back when the socket dropped; the operator decides again);
listening is, because it changes nothing on the call.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.events import CallEnded, Command, Event, Listen, Unlisten, WireError, from_wire
from engine.supervisor import protocol as p

log = logging.getLogger("xswarm.supervisor.client")


class SupervisorError(Exception):
    """Base of the client's errors."""


class AuthError(SupervisorError):
    """The server refused the token (HTTP 401/429 or close code 4401/4429); retrying won't help."""


class CommandError(SupervisorError):
    """The server answered a command with ``error``; ``code`` is machine-readable."""

    def __init__(self, message: str, code: str | None = None, answer: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.answer = answer or {}


class Disconnected(SupervisorError):
    """The socket dropped before the answer came (the command may or may not have run)."""


@dataclass(frozen=True)
class Snapshot:
    """The state the server sends first on every connection (node, model, calls, recent events)."""

    data: dict[str, Any]


@dataclass(frozen=True)
class Audio:
    """One decoded audio frame: float32 mono 24 kHz, plus how far behind live it arrived."""

    call_id: str
    direction: str
    seq: int
    pcm: np.ndarray
    captured_at: float
    received_at: float

    @property
    def delay_s(self) -> float:
        """Receive time minus the server's tap time (needs roughly synchronised clocks)."""
        return self.received_at - self.captured_at


Message = Snapshot | Event


class SupervisorClient:
    """A reconnecting supervisor connection (use as ``async with``)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        name: str | None = None,
        header_auth: bool = True,
        backoff_s: tuple[float, float] = (0.2, 5.0),
        max_queue: int = 10_000,
        open_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.token = token
        self.name = name
        self.header_auth = header_auth
        """Send the token in ``Authorization`` (default) or as the first ``auth`` message."""
        self.backoff_s = backoff_s
        self.open_timeout = open_timeout
        self.snapshot: dict[str, Any] | None = None
        self.role: str | None = None
        self.actor: str | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.last_connect_error: str | None = None
        self.retry_at: float | None = None
        """``time.monotonic()`` of the next connection attempt while disconnected (None: connected
        or connecting now), so a console can say "retrying in N s"."""
        self.last_error: str | None = None
        """The latest error the server sent that answered no command (bad operator audio)."""
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._messages: asyncio.Queue[Message | BaseException | None] = asyncio.Queue(max_queue)
        self._audio: asyncio.Queue[Audio] = asyncio.Queue(256)
        self._listening: dict[str, str] = {}
        """call_id -> codec, re-sent after a reconnect."""
        self._decoders: dict[tuple[str, str], p.OpusDecoder] = {}
        self._streams: dict[str, p.AudioStream] = {}
        """Operator audio going out, per call."""
        self._runner: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._closed = False

    # ------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SupervisorClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, wait: bool = True) -> None:
        """Start connecting; with ``wait`` return once the first snapshot is in (raising
        ``AuthError`` at once for a bad token)."""
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="supervisor-client")
        if wait:
            await self.wait_snapshot()

    async def wait_snapshot(self, timeout: float | None = 10.0) -> dict[str, Any]:
        waiter = asyncio.ensure_future(self.connected.wait())
        runner = self._runner
        done, _ = await asyncio.wait(
            {waiter, runner} if runner else {waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            if self._fatal is not None:
                raise self._fatal
            why = f": {self.last_connect_error}" if self.last_connect_error else ""
            raise SupervisorError(f"no snapshot from {self.url} within {timeout} s{why}")
        assert self.snapshot is not None
        return self.snapshot

    async def close(self) -> None:
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except (asyncio.CancelledError, Exception):
                pass
        if self._ws is not None:
            await self._ws.close()
        self._fail_pending(Disconnected("client closed"))
        await self._deliver(None)  # ends messages()

    # ---------------------------------------------------------------------- connection

    async def _run(self) -> None:
        delay = self.backoff_s[0]
        while not self._closed:
            try:
                await self._session()
                delay = self.backoff_s[0]  # a session that got in resets the backoff
            except AuthError as exc:
                self._fatal = exc
                await self._deliver(exc)
                return
            except (OSError, ConnectionClosed, InvalidStatus, TimeoutError, SupervisorError) as exc:
                self.last_connect_error = str(exc) or type(exc).__name__
                log.info("supervisor connection to %s lost: %s", self.url, self.last_connect_error)
            self.connected.clear()
            self._fail_pending(Disconnected("connection lost"))
            if self._closed:
                return
            wait = delay * (0.75 + random.random() / 2)
            self.retry_at = time.monotonic() + wait
            await asyncio.sleep(wait)
            self.retry_at = None
            delay = min(delay * 2, self.backoff_s[1])
            self.reconnects += 1

    async def _session(self) -> None:
        headers = {}
        if self.header_auth:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.name:
            headers["X-Xswarm-Name"] = self.name
        try:
            ws = await connect(
                self.url,
                additional_headers=headers,
                open_timeout=self.open_timeout,
                max_size=p.MAX_FRAME_BYTES,
                compression=None,
                ping_interval=10,
                ping_timeout=10,
                close_timeout=2,
            )
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403, 429):
                raise AuthError(f"supervisor refused the token (HTTP {exc.response.status_code})") from None
            raise
        self._ws = ws
        try:
            if not self.header_auth:
                await ws.send(p.encode({"v": p.VERSION, "type": p.AUTH, "token": self.token, "name": self.name}))
            try:
                async for raw in ws:
                    if isinstance(raw, bytes):
                        self._on_audio(raw)
                    else:
                        await self._on_text(raw)
            except ConnectionClosed:
                pass
            code = ws.close_code
            if code in (p.CLOSE_UNAUTHORIZED, p.CLOSE_RATE_LIMITED):
                raise AuthError(f"supervisor refused the token ({code} {ws.close_reason})")
            if self.snapshot is None or not self.connected.is_set():
                raise SupervisorError(f"closed before the snapshot ({code} {ws.close_reason})")
        finally:
            self._ws = None

    async def _on_text(self, raw: str) -> None:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("supervisor sent invalid JSON")
            return
        kind = data.get("type")
        if kind == p.SNAPSHOT:
            self.snapshot = data
            you = data.get("you") or {}
            self.role, self.actor = you.get("role"), you.get("actor")
            self.connected.set()
            await self._deliver(Snapshot(data))
            for call_id, codec in list(self._listening.items()):
                asyncio.get_running_loop().create_task(self._relisten(call_id, codec))
            return
        if kind in (p.OK, p.ERROR, p.PONG):
            future = self._pending.pop(str(data.get("id")), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif kind == p.ERROR:  # not an answer: e.g. about an operator audio frame
                self.last_error = str(data.get("error"))
                log.warning("supervisor error: %s", self.last_error)
            return
        try:
            event = from_wire(data)
        except WireError:
            log.debug("skipping unknown message type %r (a newer server?)", kind)
            return
        if isinstance(event, CallEnded):
            self._forget(event.call_id)
        if isinstance(event, Event):
            await self._deliver(event)

    def _forget(self, call_id: str) -> None:
        """Drop a finished call's codec state: its outgoing stream, its decoders, and its
        listen (never re-sent after a reconnect), so a long session does not keep every call."""
        self._streams.pop(call_id, None)
        self._listening.pop(call_id, None)
        for key in [k for k in self._decoders if k[0] == call_id]:
            del self._decoders[key]

    async def _relisten(self, call_id: str, codec: str) -> None:
        try:
            await self.command(Listen(call_id), codec=codec)
        except SupervisorError as exc:
            log.info("could not listen to %s again after reconnecting: %s", call_id, exc)
            self._listening.pop(call_id, None)

    def _on_audio(self, raw: bytes) -> None:
        received_at = time.time()
        try:
            frame = p.AudioFrame.unpack(raw)
            if frame.codec == "pcm16":
                pcm = p.pcm16_to_float(frame.payload)
            else:
                key = (frame.call_id, frame.direction)
                decoder = self._decoders.get(key)
                if decoder is None:
                    decoder = self._decoders[key] = p.OpusDecoder()
                pcm = decoder.decode(frame.payload)
        except p.ProtocolError as exc:
            log.warning("bad audio frame from the supervisor: %s", exc)
            return
        audio = Audio(frame.call_id, frame.direction, frame.seq, pcm, frame.captured_at, received_at)
        if self._audio.full():  # the application is not reading audio: keep the newest
            self._audio.get_nowait()
        self._audio.put_nowait(audio)

    async def _deliver(self, item: Message | BaseException | None) -> None:
        if self._messages.full():  # a consumer that stopped reading loses the oldest, not the socket
            self._messages.get_nowait()
        self._messages.put_nowait(item)

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    # --------------------------------------------------------------------------- usage

    async def messages(self) -> AsyncIterator[Message]:
        """Snapshots (one per connection) and events, in order; ends on ``close``; raises
        ``AuthError`` when the server refuses the token."""
        while True:
            item = await self._messages.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def next_message(self, timeout: float | None = None) -> Message:
        item = await asyncio.wait_for(self._messages.get(), timeout)
        if item is None:
            raise Disconnected("client closed")
        if isinstance(item, BaseException):
            raise item
        return item

    async def audio(self) -> AsyncIterator[Audio]:
        while True:
            yield await self._audio.get()

    async def next_audio(self, timeout: float | None = None) -> Audio:
        return await asyncio.wait_for(self._audio.get(), timeout)

    async def request(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send one JSON message with a fresh id and return its answer (``ok``/``error``/``pong``)."""
        ws = self._ws
        if ws is None or not self.connected.is_set():
            raise Disconnected(f"not connected to {self.url}")
        msg_id = str(next(self._ids))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await ws.send(p.encode({"v": p.VERSION, **message, "id": msg_id}))
            return await asyncio.wait_for(future, timeout)
        except ConnectionClosed:
            raise Disconnected("connection lost") from None
        finally:
            self._pending.pop(msg_id, None)

    async def command(self, command: Command, timeout: float = 10.0, **options: Any) -> dict[str, Any]:
        """Send a command; returns the ``ok`` answer (with ``"ok": True``, the shape
        ``CallControl.execute`` returns in embedded mode) or raises ``CommandError``."""
        answer = await self.request({**command.to_wire(), **options}, timeout)
        if answer.get("type") == p.ERROR:
            raise CommandError(str(answer.get("error")), answer.get("code"), answer)
        if isinstance(command, Listen):
            self._listening[command.call_id] = options.get("codec", "pcm16")
        elif isinstance(command, Unlisten):
            self._listening.pop(command.call_id, None)
        return {**answer, "ok": True}

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self.request({"type": p.PING}, timeout)
        return loop.time() - start

    async def send_audio(self, call_id: str, pcm: np.ndarray, codec: str = "pcm16") -> None:
        """Operator audio (float32 mono 24 kHz) for a call this client has taken over."""
        ws = self._ws
        if ws is None:
            raise Disconnected(f"not connected to {self.url}")
        stream = self._streams.get(call_id)
        if stream is None or stream.codec != codec:
            stream = self._streams[call_id] = p.AudioStream(call_id, "operator", codec)
        try:
            await ws.send(stream.pack(pcm))
        except ConnectionClosed:
            raise Disconnected("connection lost") from None
