"""A Twilio Media Streams client that behaves like Twilio: for ``xswarm call``, demos and benchmarks.

What it does, in Twilio's order: optionally POST a signed voice webhook and follow the
``<Connect><Stream>`` it answers (URL and ``<Parameter>``s); open the WebSocket with a signed
upgrade; send ``connected`` and ``start``; stream 160-byte mu-law ``media`` every 20 ms against a
monotonic clock (no drift); play the bridge's audio through a simulated playout queue and echo
each ``mark`` when the audio queued before it has "played" (at once on ``clear``); finally
``stop`` and close. It records the reply and the figures a person wants to see.

``place_call`` also does what Twilio does after ``<Connect action="…">``: when the bridge ends
the stream while the caller is still talking (its node died or dropped it), it asks the action
URL what next and follows the answer (a re-route to another node, or a hang-up).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from engine.audio import mulaw
from engine.audio.framing import CHUNK_BYTES
from engine.telemetry.latency import Histogram

CHUNK_S = 0.02


class SimulationError(Exception):
    """The call could not be placed (webhook refused, no stream in the TwiML, connect failed)."""


@dataclass
class StreamTarget:
    """Where to stream and with which ``<Parameter>``s (from TwiML, or given directly)."""

    url: str
    parameters: dict[str, str] = field(default_factory=dict)
    _: KW_ONLY
    signed_url: str | None = None
    """The URL Twilio would have dialled, which the signature covers (a node with
    ``server.bridge_public_url`` checks against that); None: ``url`` itself."""
    action: str | None = None
    """``<Connect action>``: where Twilio asks what next when the stream ends."""
    said: str = ""
    """What ``<Say>`` told the caller before the stream."""


@dataclass
class CallReport:
    call_sid: str
    stream_sid: str
    url: str
    chunks_sent: int = 0
    chunks_received: int = 0
    marks_echoed: int = 0
    clears: int = 0
    first_audio_ms: float | None = None
    """``start`` sent -> first ``media`` received (admission plus one tick)."""
    echo_delay_ms: float | None = None
    """Mouth-to-ear delay of our own audio coming back (echo model): its offset inside the
    reply plus when the reply started, against when we sent it (playout assumed continuous)."""
    gap_ms: dict[str, Any] = field(default_factory=dict)
    """Spacing of received frames (4 media + mark each 80 ms): jitter as the caller sees it."""
    playout_lag_ms: dict[str, Any] = field(default_factory=dict)
    send_late_ms: dict[str, Any] = field(default_factory=dict)
    """How far behind its 20 ms slot each chunk left (our own pacing jitter, not the bridge's)."""
    close_code: int | None = None
    close_reason: str = ""
    stopped: bool = False
    """The caller side ended the stream (``stop``); False when the bridge ended or lost it."""
    first_audio_at: float | None = None
    """Loop time of the first reply audio (for re-route timing)."""
    duration_s: float = 0.0
    reply: bytes = b""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("reply")
        data["reply_seconds"] = round(len(self.reply) / 8000, 3)
        return data


def sign(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """X-Twilio-Signature for a URL (and POST form parameters), computed by Twilio's SDK."""
    from twilio.request_validator import RequestValidator

    return RequestValidator(auth_token).compute_signature(url, params or {})


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


async def voice_webhook(
    webhooks_url: str,
    auth_token: str,
    *,
    call_sid: str,
    account_sid: str,
    caller: str,
    called: str = "+15005550006",
    public_url: str | None = None,
) -> StreamTarget:
    """POST the voice webhook as Twilio does and return the stream the TwiML points at.

    ``public_url``: the base URL Twilio is configured with (a node behind a proxy checks the
    signature against it); the POST still goes to ``webhooks_url``."""
    import aiohttp

    url = webhooks_url.rstrip("/") + "/twilio/voice"
    signed = (public_url or webhooks_url).rstrip("/") + "/twilio/voice"
    form = {
        "CallSid": call_sid,
        "AccountSid": account_sid,
        "From": caller,
        "To": called,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    headers = {"X-Twilio-Signature": sign(auth_token, signed, form)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.post(url, data=form, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise SimulationError(f"voice webhook answered {resp.status}: {body[:200]}")
    return parse_twiml(body)


def parse_twiml(body: str) -> StreamTarget:
    """The ``<Connect><Stream>`` of a TwiML answer, or SimulationError with what it said instead."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise SimulationError(f"voice webhook did not answer TwiML: {exc}") from None
    stream = root.find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        said = " ".join((el.text or "").strip() for el in root.iter("Say"))
        raise SimulationError(f"no stream in the TwiML (the call was not put through){': ' + said if said else ''}")
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    connect = root.find("./Connect")
    said = " ".join((el.text or "").strip() for el in root.iter("Say"))
    action = connect.get("action") if connect is not None else None
    return StreamTarget(stream.get("url", ""), params, action=action, said=said)


class _Playout:
    """Twilio's outbound queue as the caller hears it: 20 ms per media, marks echoed in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, echo: Any) -> None:
        self.loop = loop
        self.echo = echo
        self.ends_at = 0.0
        self.pending: list[tuple[asyncio.TimerHandle, str]] = []

    def media(self) -> None:
        self.ends_at = max(self.ends_at, self.loop.time()) + CHUNK_S

    def mark(self, name: str) -> None:
        when = max(self.ends_at, self.loop.time())
        handle = self.loop.call_at(when, self._fire, name)
        self.pending.append((handle, name))

    def _fire(self, name: str) -> None:
        self.pending = [(h, n) for h, n in self.pending if n != name]
        self.echo(name)

    def clear(self) -> None:
        self.ends_at = self.loop.time()
        pending, self.pending = self.pending, []
        for handle, name in pending:
            handle.cancel()
            self.echo(name)


async def stream_call(
    target: StreamTarget,
    audio: bytes,
    *,
    auth_token: str | None = None,
    call_sid: str | None = None,
    account_sid: str = "AC" + "0" * 32,
    tail_s: float = 0.5,
    open_timeout: float = 10.0,
    on_sent: Callable[[int, float], None] | None = None,
    on_media: Callable[[float, bytes], None] | None = None,
) -> CallReport:
    """Play ``audio`` (8 kHz mu-law) into a bridge in real time and record what comes back.

    ``on_sent(k, t)`` / ``on_media(t, payload)`` (t: the loop's monotonic clock) let a
    measurement see when chunk k left and when each reply chunk arrived (benchmarks/supervisor.py)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    call_sid = call_sid or new_sid("CA")
    stream_sid = new_sid("MZ")
    report = CallReport(call_sid=call_sid, stream_sid=stream_sid, url=target.url)
    headers = {"X-Twilio-Signature": sign(auth_token, target.signed_url or target.url)} if auth_token else {}
    started = time.monotonic()
    reply = bytearray()
    gaps = Histogram()
    lag = Histogram()
    pace = Histogram()
    try:
        ws = await connect(
            target.url, additional_headers=headers, open_timeout=open_timeout, compression=None, max_size=2**20
        )
    except Exception as exc:
        raise SimulationError(f"cannot open {target.url}: {exc}") from None
    loop = asyncio.get_running_loop()
    sequence = 0
    mark_queued: dict[str, float] = {}
    outgoing: asyncio.Queue[str] = asyncio.Queue()

    def next_seq() -> str:
        nonlocal sequence
        sequence += 1
        return str(sequence)

    def echo_mark(name: str) -> None:
        queued_at = mark_queued.pop(name, None)
        if queued_at is not None:
            lag.observe((loop.time() - queued_at) * 1000)
        report.marks_echoed += 1
        outgoing.put_nowait(
            json.dumps({"event": "mark", "sequenceNumber": next_seq(), "streamSid": stream_sid, "mark": {"name": name}})
        )

    playout = _Playout(loop, echo_mark)
    start_sent = 0.0
    origin = 0.0
    first_audio_at: float | None = None
    last_mark_at: float | None = None

    async def receive() -> None:
        nonlocal last_mark_at, first_audio_at
        async for raw in ws:
            msg = json.loads(raw)
            event = msg.get("event")
            if event == "media":
                if first_audio_at is None:
                    first_audio_at = loop.time()
                    report.first_audio_at = first_audio_at
                    report.first_audio_ms = round((first_audio_at - start_sent) * 1000, 3)
                payload = base64.b64decode(msg["media"]["payload"])
                reply.extend(payload)
                if on_media is not None:
                    on_media(loop.time(), payload)
                report.chunks_received += 1
                playout.media()
            elif event == "mark":
                now = loop.time()
                if last_mark_at is not None:
                    gaps.observe((now - last_mark_at) * 1000)
                last_mark_at = now
                name = msg["mark"]["name"]
                mark_queued[name] = now
                playout.mark(name)
            elif event == "clear":
                report.clears += 1
                playout.clear()

    async def send_all() -> None:
        while True:
            await ws.send(await outgoing.get())

    receiver = loop.create_task(receive())
    sender = loop.create_task(send_all())
    try:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start_sent = loop.time()
        await ws.send(
            json.dumps(
                {
                    "event": "start",
                    "sequenceNumber": next_seq(),
                    "streamSid": stream_sid,
                    "start": {
                        "accountSid": account_sid,
                        "streamSid": stream_sid,
                        "callSid": call_sid,
                        "tracks": ["inbound"],
                        "customParameters": target.parameters,
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    },
                }
            )
        )
        origin = loop.time()
        silence_tail = bytes([mulaw.SILENCE]) * int(tail_s / CHUNK_S) * CHUNK_BYTES
        data = audio + silence_tail
        for k in range(len(data) // CHUNK_BYTES):
            delay = origin + k * CHUNK_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiver.done():
                break
            pace.observe((loop.time() - origin - k * CHUNK_S) * 1000)
            payload = base64.b64encode(data[k * CHUNK_BYTES : (k + 1) * CHUNK_BYTES]).decode()
            # the same JSON json.dumps would give, from a template: 100 calls send 5,000 a second
            await ws.send(
                f'{{"event":"media","sequenceNumber":"{next_seq()}","streamSid":"{stream_sid}",'
                f'"media":{{"track":"inbound","chunk":"{k + 1}","timestamp":"{k * 20}","payload":"{payload}"}}}}'
            )
            report.chunks_sent += 1
            if on_sent is not None:
                on_sent(k, loop.time())
        if not receiver.done():
            report.stopped = True
            await ws.send(
                json.dumps(
                    {
                        "event": "stop",
                        "sequenceNumber": next_seq(),
                        "streamSid": stream_sid,
                        "stop": {"accountSid": account_sid, "callSid": call_sid},
                    }
                )
            )
            await asyncio.wait_for(asyncio.shield(receiver), timeout=2.0)
    except (ConnectionClosed, TimeoutError):
        pass
    finally:
        sender.cancel()
        receiver.cancel()
        await ws.close()
        if ws.close_code is not None:
            report.close_code = ws.close_code
            report.close_reason = ws.close_reason or ""
    report.duration_s = round(time.monotonic() - started, 3)
    report.reply = bytes(reply)
    report.gap_ms = gaps.summary()
    report.playout_lag_ms = lag.summary()
    report.send_late_ms = pace.summary()
    in_reply = await asyncio.to_thread(echo_delay_ms, audio, report.reply)  # FFTs: off the pacing loop
    if in_reply is not None and first_audio_at is not None:
        report.echo_delay_ms = round(in_reply + (first_audio_at - origin) * 1000, 3)
    return report


def echo_delay_ms(sent: bytes, reply: bytes, max_delay_s: float = 1.0) -> float | None:
    """Where our own audio reappears in the reply (FFT cross-correlation), in ms; None if it
    does not. FFT because a direct correlation of seconds of audio would take seconds; numpy
    releases the GIL for it, so ``stream_call`` runs it on a thread, off the loop that paces
    the other simulated calls."""
    x = mulaw.decode(sent)
    y = mulaw.decode(reply)
    n = min(len(x), 8000 * 4)
    lags = int(max_delay_s * 8000)
    if n < 1600 or len(y) < n or float(np.std(x[:n])) < 1e-3:
        return None
    xs = x[:n] - x[:n].mean()
    ys = y[: n + lags]
    size = 1 << int(np.ceil(np.log2(len(ys) + n)))
    corr = np.fft.irfft(np.fft.rfft(ys, size) * np.conj(np.fft.rfft(xs, size)), size)[: len(ys) - n + 1]
    best = int(np.argmax(corr))
    peak = corr[best] / (np.linalg.norm(xs) * np.linalg.norm(ys[best : best + n]) + 1e-9)
    return round(best / 8.0, 3) if peak > 0.5 else None


def websocket_url(base: str) -> str:
    """Accept ``ws://host:port``, ``http://…`` or a full ``…/twilio`` URL for the bridge."""
    parts = urlsplit(base if "://" in base else f"ws://{base}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path.endswith("/twilio") else parts.path.rstrip("/") + "/twilio"
    return f"{scheme}://{parts.netloc}{path}"


@dataclass
class PlacedCall:
    """A call placed through the voice webhook, with every leg Twilio would have streamed."""

    call_sid: str
    legs: list[CallReport] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    """The bridge URL of each leg."""
    reroute_s: list[float] = field(default_factory=list)
    """Per re-route: action callback sent -> first audio from the new node."""
    webhook_ms: list[float] = field(default_factory=list)
    """How long each webhook (the voice webhook, then each action callback) took to answer."""
    outcome: str = "completed"
    """completed (the caller finished talking), hung up (the line ended the call), or not
    connected (no stream in an answer: busy, voicemail, refusal; ``said`` says what)."""
    said: str = ""


async def place_call(
    webhooks_url: str,
    auth_token: str,
    audio: bytes,
    *,
    call_sid: str | None = None,
    account_sid: str = "AC" + "0" * 32,
    caller: str = "+15005550006",
    called: str = "+15005550007",
    max_legs: int = 5,
    **stream_options: Any,
) -> PlacedCall:
    """Twilio's whole part of one inbound call: the signed voice webhook, the stream it names,
    and, when the bridge ends a stream before the caller does, the signed ``<Connect action>``
    callback and the stream (rest of the audio) it answers with."""
    import aiohttp

    call_sid = call_sid or new_sid("CA")
    placed = PlacedCall(call_sid)
    base = webhooks_url.rstrip("/")
    form = {
        "CallSid": call_sid,
        "AccountSid": account_sid,
        "From": caller,
        "To": called,
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
    }
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:

        async def post(path: str, status: str) -> str:
            url = base + path
            data = {**form, "CallStatus": status}
            headers = {"X-Twilio-Signature": sign(auth_token, url, data)}
            sent = loop.time()
            async with session.post(url, data=data, headers=headers) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise SimulationError(f"{path} answered {resp.status}: {body[:200]}")
            placed.webhook_ms.append(round((loop.time() - sent) * 1000, 3))
            return body

        body = await post("/twilio/voice", "ringing")
        rest = audio
        action_at: float | None = None
        for _ in range(max_legs):
            try:
                target = parse_twiml(body)
            except SimulationError as exc:
                placed.outcome = "hung up" if "<Hangup" in body and action_at is not None else "not connected"
                placed.said = str(exc)
                return placed
            placed.said = target.said
            try:
                report = await stream_call(
                    target, rest, auth_token=auth_token, call_sid=call_sid, account_sid=account_sid, **stream_options
                )
            except SimulationError as exc:  # the node is gone: Twilio asks the action URL too
                report = CallReport(call_sid=call_sid, stream_sid="", url=target.url, close_reason=str(exc))
            placed.legs.append(report)
            placed.nodes.append(target.url)
            if action_at is not None and report.first_audio_at is not None:
                placed.reroute_s.append(round(report.first_audio_at - action_at, 3))
            if report.stopped or target.action is None:
                placed.outcome = "completed" if report.stopped else "hung up"
                return placed
            rest = rest[report.chunks_sent * CHUNK_BYTES :]
            action_at = loop.time()
            body = await post(target.action, "in-progress")
    placed.outcome = "hung up"
    return placed
