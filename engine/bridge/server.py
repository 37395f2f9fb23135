"""Twilio Media Streams server (``/twilio``) and ``GET /health`` on one port (default 9998).

One ``TwilioStream`` per socket. Its life: the upgrade is refused (403) unless
``X-Twilio-Signature`` is valid for our public URL; then ``connected``, and ``start`` must come
within ``telephony.start_timeout_s`` with 8 kHz mu-law and a one-time token bound to its
CallSid, which also says who calls (user, number, theme: ``engine.telephony.calltoken``; the
``start`` message's own parameters are not trusted for these); the call is admitted into a
model slot; ``media`` feeds the call's jitter buffer, ``mark`` echoes give the playout lag,
``dtmf`` goes on the bus, ``stop`` ends the call.
The JSON of each message (what Twilio sends, what we send back) is read and written by
``engine.bridge.twilio_wire``; the server owns the call-token secret and checks tokens.

Every refusal closes only its own socket with a 4xxx code and a reason (1009 for an oversized
message, which websockets enforces), counts it in ``refusals``, logs one line and publishes
``CallRefused``. Output goes through a per-call writer task so a slow socket never holds up
the tick or the other calls. Nothing is logged per frame.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from engine import events
from engine.audio.framing import InboundFrames, split_frame
from engine.bridge import twilio_wire as wire
from engine.calls import CallControlError, CallSession, NoFreeSlot, NoHeadroom
from engine.config import secret
from engine.host import RuntimeHost
from engine.http_answers import json_response
from engine.ratelimit import RateLimit, TokenBucket
from engine.store import calltokens
from engine.store.db import Database
from engine.telemetry.latency import Histogram
from engine.telephony import twilio_rest
from engine.telephony.calltoken import Claims, TokenError, TokenLedger, Verified

if TYPE_CHECKING:
    from engine.models.base import VoiceModel

log = logging.getLogger("xswarm.bridge")

PATH = "/twilio"
MAX_MESSAGE = 64 * 1024
FLOOD_LIMIT = RateLimit(rate=150.0, burst=300.0)
"""Messages per second a stream may sustain (Twilio sends 50 media + a few marks)."""
WRITE_BUFFER_LIMIT = 16 * 1024
"""Bytes (about 1 s of output) a call's socket may hold unsent before we drop frames."""
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Refusal(Exception):
    """Close this stream: ``key`` is the counter name, ``code``/``reason`` go on the wire."""

    def __init__(self, key: str, code: int, reason: str) -> None:
        super().__init__(reason)
        self.key, self.code, self.reason = key, code, reason


# close codes (4000-4999 are the application's own)
START_TIMEOUT = 4001
BAD_FORMAT = 4002
BAD_TOKEN = 4003
MALFORMED = 4004
FLOOD = 4008
NO_SLOT = 4009
NOT_READY = 4010
NO_HEADROOM = 4011


class BridgeHost(RuntimeHost, Protocol):
    """What the bridge uses of the runtime that hosts it."""

    @property
    def model(self) -> VoiceModel | None: ...
    @property
    def model_state(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def db(self) -> Database | None: ...


class BridgeServer:
    """The websockets server; owns the token ledger and the bridge-wide figures."""

    def __init__(self, runtime: BridgeHost) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.ledger = TokenLedger()
        self.bal_ms = Histogram()
        self.tick_to_send_ms = Histogram()
        """The part of BAL after the tick fired (step, DSP, hand-off, send): BAL minus the
        wait for the tick, which depends on each caller's 20 ms phase against our 80 ms grid."""
        self.playout_lag_ms = Histogram()
        self.refusals: Counter[str] = Counter()
        self.dropped_frames = 0
        """Output frames not written because a caller's socket was congested (all streams)."""
        self.streams: set[TwilioStream] = set()
        self.port: int | None = None
        self._server: Server | None = None
        self._auth_token = secret(self.settings.twilio.auth_token)
        self._token_secret = secret(self.settings.telephony.call_token_secret)

    async def start(self, host: str, port: int) -> None:
        db = self.runtime.db
        if db is not None:  # tokens used before a restart stay used until they expire
            for nonce, expires in calltokens.unexpired(db):
                self.ledger.remember(nonce, expires)
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._http,
            max_size=MAX_MESSAGE,
            compression=None,
            max_queue=64,
            server_header=None,
            close_timeout=2,
        )
        self.port = self._server.sockets[0].getsockname()[1] if self._server.sockets else port
        if not self._auth_token:
            log.warning(
                "bridge on %s:%s does not check X-Twilio-Signature: TWILIO_AUTH_TOKEN is not set", host, self.port
            )
        if not self._token_secret:
            if host in LOOPBACK:
                log.warning(
                    "bridge accepts calls without a call token: XSWARM_CALL_TOKEN_SECRET is not set (loopback only)"
                )
            else:
                log.error("XSWARM_CALL_TOKEN_SECRET is not set: the bridge on %s refuses every call", host)
        log.info("bridge listening on %s:%s%s", host, self.port, PATH)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def tokens_required(self) -> bool:
        return bool(self._token_secret) or self.settings.server.host not in LOOPBACK

    # --------------------------------------------------------------------- HTTP side

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/health" and "upgrade" not in request.headers.get("Connection", "").lower():
            return json_response(connection, 200, self.health())
        if path != PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        if self._auth_token and not self._signature_ok(request):
            self.refused("bad_signature", "X-Twilio-Signature missing or invalid", None)
            return connection.respond(http.HTTPStatus.FORBIDDEN, "invalid Twilio signature\n")
        return None

    def _signature_ok(self, request: Request) -> bool:
        from twilio.request_validator import RequestValidator

        signature = request.headers.get("X-Twilio-Signature")
        if not signature:
            return False
        public = self.settings.server.bridge_public_url
        if public:
            candidates = [public.rstrip("/") + request.path]
        else:  # no public URL configured: trust the Host header Twilio dialled
            host = request.headers.get("Host", "")
            candidates = [f"wss://{host}{request.path}", f"ws://{host}{request.path}"]
        validator = RequestValidator(self._auth_token)
        return any(validator.validate(url, {}, signature) for url in candidates)

    def health(self) -> dict[str, Any]:
        rt = self.runtime
        return {
            "status": "ok" if rt.model is not None else "starting",
            "service": "bridge",
            "node": rt.node_id,
            "model": rt.model.name if rt.model else None,
            "model_state": rt.model_state,
            "slots": {"total": rt.calls.capacity, "used": rt.calls.used, "free": rt.calls.free},
            "uptime_s": round(time.time() - rt.started_at, 1),
            "auth": {"signature": bool(self._auth_token), "call_token": self.tokens_required},
        }

    def describe(self) -> dict[str, Any]:
        return {
            "streams": len(self.streams),
            "bal_ms": self.bal_ms.summary(),
            "tick_to_send_ms": self.tick_to_send_ms.summary(),
            "playout_lag_ms": self.playout_lag_ms.summary(),
            "refusals": dict(self.refusals),
            "dropped_frames": self.dropped_frames,
        }

    def check_token(self, token: object, call_sid: str) -> Verified | None:
        """Burn the stream's one-time call token for ``call_sid`` and return it (its claims say
        who calls); None when this node takes calls without tokens. ``Refusal`` when it is
        missing, invalid, expired or used, or when this node requires tokens it cannot check."""
        if not self.tokens_required:
            return None
        if not self._token_secret:
            raise Refusal("bad_token", BAD_TOKEN, "call tokens are not configured on this node")
        if not isinstance(token, str) or not token:
            raise Refusal("bad_token", BAD_TOKEN, "missing call token")
        try:
            return self.ledger.burn(self._token_secret, token, call_sid)
        except TokenError as exc:
            raise Refusal("bad_token", BAD_TOKEN, str(exc)) from None

    def refused(self, key: str, reason: str, call_sid: str | None) -> None:
        self.refusals[key] += 1
        log.warning("refused stream%s: %s (%s)", f" for {call_sid}" if call_sid else "", reason, key)
        self.runtime.bus.publish(events.CallRefused(reason=key, detail=reason))

    # -------------------------------------------------------------------- WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        stream = TwilioStream(self, ws)
        self.streams.add(stream)
        try:
            await stream.run()
        finally:
            self.streams.discard(stream)


class TwilioStream:
    """One Twilio Media Stream: protocol, admission, and the call's transport."""

    source = "twilio"

    def __init__(self, server: BridgeServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.session: CallSession | None = None
        self.stream_sid = ""
        self.call_sid: str | None = None
        self._media = wire.MediaWriter("")
        self._marks: dict[str, float] = {}
        self._cleared_at = 0.0
        self._flood = TokenBucket(FLOOD_LIMIT)
        self._unknown_logged = False
        self._dropped_logged = False
        self._end_reason: str | None = None

    # ---------------------------------------------------------------------- receive

    async def run(self) -> None:
        registry = self.server.runtime.calls
        try:
            try:
                async with asyncio.timeout(self.server.settings.telephony.start_timeout_s):
                    while self.session is None and self._end_reason is None:
                        self._on_message(await self.ws.recv())
            except TimeoutError:
                raise Refusal("start_timeout", START_TIMEOUT, "no start message in time") from None
            if self._end_reason is None:  # not stopped before it started
                async for raw in self.ws:
                    self._on_message(raw)
                    if self._end_reason:
                        break
            if self._end_reason is None:
                self._end_reason = "stream closed"
        except Refusal as refusal:
            self.server.refused(refusal.key, refusal.reason, self.call_sid)
            self._end_reason = f"refused: {refusal.key}"
            await self.ws.close(refusal.code, refusal.reason)
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == 1009:
                self.server.refused("message_too_big", f"message over {MAX_MESSAGE} bytes", self.call_sid)
                self._end_reason = "refused: message_too_big"
            elif self._end_reason is None:
                self._end_reason = "connection lost"
        finally:
            if self.session is not None:
                registry.finish(self.session, self._end_reason or "stream closed")
        if self._end_reason in ("caller hung up",):
            await self.ws.close(1000, "stream stopped")

    def _on_message(self, raw: str | bytes) -> None:
        now = time.monotonic()
        if not self._flood.take(now):
            raise Refusal("flood", FLOOD, "message flood")
        try:
            self._dispatch(raw, now)
        except wire.WireError as exc:
            code = BAD_FORMAT if exc.key == "bad_media_format" else MALFORMED
            raise Refusal(exc.key, code, exc.reason) from None

    def _dispatch(self, raw: str | bytes, now: float) -> None:
        event, msg = wire.decode(raw)
        if event == "media":
            self._on_media(msg, now)
        elif event == "mark":
            self._on_mark(msg, now)
        elif event == "start":
            self._on_start(msg)
        elif event == "dtmf":
            self._on_dtmf(msg)
        elif event == "stop":
            self._end_reason = "caller hung up"
        elif event == "connected":
            pass
        elif not self._unknown_logged:
            self._unknown_logged = True
            log.info("stream %s: ignoring unknown event %r", self.stream_sid or "?", event)

    def _on_media(self, msg: dict[str, Any], now: float) -> None:
        audio, track = wire.media(msg)
        if self.session is None or track not in wire.INBOUND_TRACKS:
            return
        self.session.inbound.push(audio, now)  # type: ignore[union-attr]

    def _on_mark(self, msg: dict[str, Any], now: float) -> None:
        name = wire.mark_name(msg)
        sent = self._marks.pop(name, None) if name is not None else None
        if sent is None or sent < self._cleared_at or self.session is None:
            return  # unknown, or flushed by a clear: it was discarded, not played
        lag = (now - sent) * 1000
        self.session.playout_lag.observe(lag)
        self.session.last_lag_ms = round(lag, 3)
        self.server.playout_lag_ms.observe(lag)

    def _on_dtmf(self, msg: dict[str, Any]) -> None:
        digit = wire.dtmf_digit(msg)
        if self.session is None or digit is None:
            return
        log.debug("call %s: DTMF %s", self.session.call_id, digit)
        self.server.runtime.bus.publish(events.DtmfReceived(call_id=self.session.call_id, digit=digit))

    def _on_start(self, msg: dict[str, Any]) -> None:
        if self.session is not None:
            return  # a repeated start changes nothing
        start = wire.start(msg)
        stream_sid, call_sid = start.stream_sid, start.call_sid
        self.stream_sid, self.call_sid = stream_sid, call_sid
        self._media = wire.MediaWriter(stream_sid)
        start.check_format()
        params = start.parameters()
        verified = self.server.check_token(params.get("token"), call_sid)
        if verified is not None:
            claims = verified.claims
            self._record_token(verified)
        else:  # no call tokens (loopback development): the parameters say who calls
            user_id = params.get("user_id")
            claims = Claims(
                None if user_id in (None, "", "guest") else _text(user_id),
                _text(params.get("caller")),
                _text(params.get("theme") or params.get("persona")),
            )
        session = CallSession(
            call_sid,
            self,
            bus=self.server.runtime.bus,
            caller=_text(claims.caller),
            user_id=None if claims.user_id in (None, "", "guest") else _text(claims.user_id),
            theme=_text(claims.theme),
            stream_sid=stream_sid,
            inbound=InboundFrames(),
        )
        try:
            self.server.runtime.calls.admit(session)
        except NoHeadroom as exc:
            raise Refusal("no_headroom", NO_HEADROOM, str(exc)) from None
        except NoFreeSlot as exc:
            if self.server.runtime.model is None:
                raise Refusal("model_not_ready", NOT_READY, "model not ready") from None
            raise Refusal("no_free_slot", NO_SLOT, str(exc)) from None
        except CallControlError as exc:
            raise Refusal("duplicate_call", BAD_TOKEN, str(exc)) from None
        self.session = session

    def _record_token(self, verified: Verified) -> None:
        """Record the burnt token in ``used_call_tokens`` (after admission, never waited for)."""
        db = self.server.runtime.db
        if db is not None:
            loop = asyncio.get_running_loop()
            recorded = calltokens.record(db, verified.nonce, verified.expires)
            recorded.add_done_callback(lambda done: loop.call_soon_threadsafe(self._token_recorded, done))

    def _token_recorded(self, done: concurrent.futures.Future[list[int]]) -> None:
        """The insert found the nonce already there: another node or an earlier run of this
        one used the token first, so this call ends (admission did not wait for the commit)."""
        try:
            counts = done.result()
        except Exception as exc:  # StoreError: the call goes on; the in-memory burn still holds here
            log.warning("call %s: used call token not recorded: %s", self.call_sid, exc)
            return
        if counts[-1] == 0 and self.session is not None and not self.ws.close_code:
            self.server.refused("bad_token", "call token already used (recorded elsewhere)", self.call_sid)
            asyncio.get_running_loop().create_task(self.close("call token already used"))

    # ------------------------------------------------------------------ transport

    def send_frame(self, session: CallSession, step: int, ulaw: bytes, pcm: np.ndarray) -> None:
        """Four 160-byte ``media`` and one ``mark``, written at once (runtime loop)."""
        name = f"f:{step}"
        messages = [self._media.message(chunk) for chunk in split_frame(ulaw)]
        messages.append(wire.mark_message(self.stream_sid, name))
        if not self._write(messages):
            self.server.dropped_frames += 1
            if not self._dropped_logged:
                self._dropped_logged = True
                log.warning("call %s: socket congested, dropping output frames", session.call_id)
            return
        sent_at = time.monotonic()
        self._marks[name] = sent_at
        if len(self._marks) > 256:  # marks Twilio never echoed (should not happen)
            self._marks.pop(next(iter(self._marks)))
        server = self.server
        server.tick_to_send_ms.observe((sent_at - session.last_tick_at) * 1000)
        if session.last_input_at is not None:
            bal = (sent_at - session.last_input_at) * 1000
            session.bal.observe(bal)
            session.last_bal_ms = round(bal, 3)
            server.bal_ms.observe(bal)

    def clear(self) -> None:
        if self._write([wire.clear_message(self.stream_sid)]):
            self._cleared_at = time.monotonic()

    def _write(self, messages: list[str]) -> bool:
        """Frame and write text messages now, without a task hop per call and tick.

        Why not ``await ws.send``: that costs one coroutine per message and one task wake-up
        per call per tick, which at 100 calls delays the last caller's audio by milliseconds.
        We use websockets' sans-I/O protocol object (the documented layer under the asyncio
        API) and hand the frames to the transport in one write. A socket whose buffer is full
        (the peer stopped reading) gets nothing: False, and the frame is dropped, not queued."""
        ws = self.ws
        if ws.protocol.state is not State.OPEN or ws.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            return False
        protocol = ws.protocol
        for message in messages:
            protocol.send_text(message.encode())
        ws.transport.write(b"".join(protocol.data_to_send()))
        return True

    async def hang_up(self, reason: str) -> None:
        """Twilio REST ``Status=completed`` when credentials are set; always close the socket."""
        if self.call_sid:
            await complete_call(self.server.settings, self.call_sid)
        await self._end(reason if reason.startswith("hung up") else f"hung up: {reason}")

    async def close(self, reason: str) -> None:
        """Close the socket without ending the call at Twilio (it falls through to the TwiML
        after ``<Connect>``): what a node going down does, so callers reach the fallback."""
        await self._end(reason)

    async def _end(self, reason: str) -> None:
        self._end_reason = reason
        if self.session is not None:
            self.server.runtime.calls.finish(self.session, reason)
        await self.ws.close(1000, _reason(reason))


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) and value else None


def _reason(text: str) -> str:
    """Close reasons are limited to 123 bytes."""
    return text.encode()[:120].decode(errors="ignore")


async def complete_call(settings: Any, call_sid: str) -> bool:
    """End a call through Twilio's REST API (``Status=completed``); 404 (Twilio code 20404)
    means it has already ended. Returns True when Twilio confirmed (or there is nothing to do:
    no credentials), False on failure (logged)."""
    if twilio_rest.credentials(settings.twilio) is None:
        return True
    try:
        async with twilio_rest.open_client(settings.twilio, timeout_s=5) as client:
            await client.update_call(call_sid, status="completed")
    except twilio_rest.TwilioError as exc:
        if exc.status == 404 or exc.code == twilio_rest.NOT_FOUND:
            log.info("call %s had already ended at Twilio", call_sid)
            return True
        log.warning("Twilio REST hang-up of %s failed: %s", call_sid, exc)
        return False
    log.info("call %s completed through Twilio REST", call_sid)
    return True
