"""Supervisor protocol v1: the wire forms shared by the server (engine/supervisor/server.py)
and the client library (engine/supervisor/client.py).

Two kinds of WebSocket frames:

* text frames: one JSON object each, ``{"v": 1, "type": …, "id": …, …}``. Events and commands
  are the dataclasses of ``engine/events.py`` in their ``to_wire`` form, so the embedded TUI and
  ``xswarm attach`` speak the same vocabulary. A handful of protocol messages (``auth``,
  ``snapshot``, ``ok``, ``error``, ``ping``, ``pong``) exist only on the socket.
* binary frames: audio, a fixed 16-byte header, the call id, then the payload (see
  ``AudioFrame``). Binary keeps 24 kHz PCM16 at 48 KB/s per direction instead of ~65 KB/s of
  base64 inside JSON, and lets the server drop audio without parsing it.

docs/supervisor-protocol.md is the operator-facing description; keep the two in step.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from engine.control import ACTIONS
from engine.events import PROTOCOL_VERSION as VERSION
from engine.events import Command, Mode, Wire, WireError, from_wire

SAMPLE_RATE = 24_000
"""Every audio frame on the socket is mono 24 kHz, the model's own rate: no resampling on the
server, and the operator hears exactly what the call hears."""

MAX_TEXT_BYTES = 64 * 1024
"""A text frame larger than this is answered with an error (commands are a few hundred bytes)."""
MAX_AUDIO_SAMPLES = SAMPLE_RATE
"""One binary frame carries at most one second of audio."""
MAX_FRAME_BYTES = 1024 * 1024
"""Past this the WebSocket layer itself closes the connection (code 1009)."""

CLOSE_UNAUTHORIZED = 4401
CLOSE_RATE_LIMITED = 4429
CLOSE_TOO_SLOW = 4408
"""The client did not read its stream fast enough and its queue overflowed."""

# Protocol-only message types (everything else is an engine.events class name).
AUTH, SNAPSHOT, OK, ERROR, PING, PONG = "auth", "snapshot", "ok", "error", "ping", "pong"

COMMAND_ALIASES: dict[str, str] = {action: cls.__name__ for cls, action in ACTIONS.items()}
"""Lower-case names a hand-typed client may use; answers and events always use class names."""

CODECS = ("pcm16", "opus")
_CODEC_IDS = {"pcm16": 0, "opus": 1}
DIRECTIONS = ("caller", "ai", "operator")
_DIRECTION_IDS = {"caller": 0, "ai": 1, "operator": 2}

_HEADER = struct.Struct("!BBBBId")
"""version, direction, codec, call-id length, sequence number, capture time (unix seconds)."""


class ProtocolError(ValueError):
    """A frame that is not valid v1; the message is sent back to the client as is."""


# ------------------------------------------------------------------------------ text frames


@dataclass(frozen=True)
class Request:
    """One parsed client text frame: a protocol message or an engine command."""

    type: str
    id: Any
    command: Command | None = None
    body: dict[str, Any] | None = None
    """Fields of a protocol message (``auth``: token, name) or options of a command that are not
    part of its dataclass (``Listen``: codec)."""


_COMMAND_OPTIONS = {"Listen": {"codec"}}
"""Per-socket options a command may carry beside its dataclass fields."""


def parse_request(text: str | bytes) -> Request:
    """Parse a client text frame; raises ``ProtocolError`` whose message names the problem.

    The id is recovered before validation where possible so the error answer can carry it.
    """
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError(f"text frame of {len(text)} bytes is over the {MAX_TEXT_BYTES}-byte limit")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("a message must be a JSON object")
    msg_id = data.get("id")
    if isinstance(msg_id, bool) or (msg_id is not None and not isinstance(msg_id, (str, int))):
        raise ProtocolError("id must be a string or an integer")
    try:
        if data.get("v") != VERSION:
            raise ProtocolError(f"unsupported protocol version {data.get('v')!r} (this server speaks v{VERSION})")
        kind = data.get("type")
        if not isinstance(kind, str):
            raise ProtocolError("type must be a string")
        if kind in (AUTH, PING):
            body = {k: v for k, v in data.items() if k not in ("v", "type", "id")}
            return Request(kind, msg_id, body=body)
        kind = COMMAND_ALIASES.get(kind, kind)
        fields = dict(data, type=kind)
        options = {k: fields.pop(k) for k in _COMMAND_OPTIONS.get(kind, ()) if k in fields}
        try:
            wire = from_wire(fields)
        except WireError as exc:
            raise ProtocolError(str(exc)) from None
        if not isinstance(wire, Command):
            raise ProtocolError(f"{kind} is an event; clients may only send commands")
        _check_fields(wire)
        return Request(kind, msg_id, command=wire, body=options)
    except ProtocolError as exc:
        raise RequestError(str(exc), msg_id) from None


def _check_fields(command: Command) -> None:
    """``from_wire`` checks names, not types: a call id of 42 or a list of text stops here."""
    call_id = getattr(command, "call_id", "")
    if not isinstance(call_id, str) or (hasattr(command, "call_id") and not call_id) or len(call_id) > 255:
        raise ProtocolError(f"{type(command).__name__}.call_id must be a string of 1..255 characters")
    text = getattr(command, "text", "")
    if not isinstance(text, str) or len(text) > 2000:
        raise ProtocolError(f"{type(command).__name__}.text must be a string of at most 2000 characters")


class RequestError(ProtocolError):
    """A frame that parsed as JSON but is not a valid request; carries its id for the answer."""

    def __init__(self, message: str, msg_id: Any) -> None:
        super().__init__(message)
        self.id = msg_id


def encode(message: dict[str, Any]) -> str:
    """Compact JSON for the wire (no spaces: this runs once per event for all clients)."""
    return json.dumps(message, separators=(",", ":"), default=str)


def event_frame(event: Wire) -> str:
    return encode(event.to_wire())


def ok_frame(msg_id: Any, **result: Any) -> str:
    return encode({"v": VERSION, "type": OK, "id": msg_id, **result})


def error_frame(msg_id: Any, error: str, **extra: Any) -> str:
    return encode({"v": VERSION, "type": ERROR, "id": msg_id, "error": error, **extra})


# ---------------------------------------------------------------------------- audio frames


@dataclass(frozen=True)
class AudioFrame:
    """One binary frame: audio of one call in one direction.

    Layout (network byte order): version u8 (1), direction u8 (0 caller, 1 ai, 2 operator),
    codec u8 (0 PCM16 little-endian, 1 Opus in Ogg pages from ``sphn``), call-id length u8,
    sequence u32, capture time f64 (unix seconds when the server tapped the frame; clients
    subtract it from their clock to see how far behind live they are), call id (UTF-8), payload.
    """

    call_id: str
    direction: str
    codec: str
    seq: int
    captured_at: float
    payload: bytes

    def pack(self) -> bytes:
        call = self.call_id.encode()
        if not 0 < len(call) < 256:
            raise ProtocolError("call id must be 1..255 bytes")
        header = _HEADER.pack(
            VERSION,
            _DIRECTION_IDS[self.direction],
            _CODEC_IDS[self.codec],
            len(call),
            self.seq & 0xFFFFFFFF,
            self.captured_at,
        )
        return header + call + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> AudioFrame:
        if len(data) < _HEADER.size + 1:
            raise ProtocolError(f"audio frame of {len(data)} bytes is shorter than its header")
        version, direction, codec, call_len, seq, captured_at = _HEADER.unpack_from(data)
        if version != VERSION:
            raise ProtocolError(f"unsupported audio frame version {version}")
        if direction >= len(DIRECTIONS) or codec >= len(CODECS):
            raise ProtocolError(f"unknown audio direction {direction} or codec {codec}")
        end = _HEADER.size + call_len
        if call_len == 0 or len(data) < end:
            raise ProtocolError("audio frame call id is empty or truncated")
        try:
            call_id = data[_HEADER.size : end].decode()
        except UnicodeDecodeError:
            raise ProtocolError("audio frame call id is not UTF-8") from None
        return cls(call_id, DIRECTIONS[direction], CODECS[codec], seq, captured_at, bytes(data[end:]))


def pcm16_bytes(pcm: np.ndarray) -> bytes:
    """float32 -1..1 -> PCM16 little-endian (clipped, so a hot signal cannot wrap around)."""
    return np.rint(np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(payload: bytes) -> np.ndarray:
    if len(payload) % 2:
        raise ProtocolError("PCM16 payload has an odd number of bytes")
    samples = len(payload) // 2
    if samples > MAX_AUDIO_SAMPLES:
        raise ProtocolError(f"audio frame of {samples} samples is over the {MAX_AUDIO_SAMPLES}-sample limit")
    return np.frombuffer(payload, "<i2").astype(np.float32) / 32768.0


class OpusEncoder:
    """Streaming Opus (Ogg pages) through sphn; one per listened direction, since it keeps state."""

    def __init__(self) -> None:
        import sphn  # optional dependency (the moshi extra); imported only when Opus is asked for

        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)

    def encode(self, pcm: np.ndarray) -> bytes:
        return bytes(self._writer.append_pcm(np.ascontiguousarray(pcm, np.float32)))


class AudioStream:
    """One direction of one call's audio as it is sent: its sequence numbers and, for Opus, the
    encoder whose state carries from frame to frame. The server's listen taps (caller and AI;
    one stream shared by every listener of that call, direction and codec) and the client's
    takeover audio (operator) both send through one of these."""

    def __init__(self, call_id: str, direction: str, codec: str) -> None:
        self.call_id, self.direction, self.codec = call_id, direction, codec
        self.seq = 0
        self._opus: OpusEncoder | None = None

    def pack(self, pcm: np.ndarray) -> bytes:
        """The next binary frame for ``pcm`` (float32 mono 24 kHz), stamped with the time now."""
        if self.codec == "opus":
            if self._opus is None:
                self._opus = OpusEncoder()
            payload = self._opus.encode(pcm)
        else:
            payload = pcm16_bytes(pcm)
        frame = AudioFrame(self.call_id, self.direction, self.codec, self.seq, time.time(), payload)
        self.seq += 1
        return frame.pack()


class OpusDecoder:
    """Streaming Opus decoder for operator audio (the counterpart of ``OpusEncoder``)."""

    def __init__(self) -> None:
        import sphn

        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)

    def decode(self, payload: bytes) -> np.ndarray:
        try:
            pcm = self._reader.append_bytes(payload)
        except Exception as exc:  # sphn raises its own errors for garbage input
            raise ProtocolError(f"bad Opus data: {exc}") from None
        return np.asarray(pcm, np.float32)


def opus_available() -> bool:
    try:
        import sphn  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------- schemas


def schemas() -> dict[str, dict[str, Any]]:
    """One JSON schema per v1 text message, derived from the dataclasses in engine/events.py
    plus the protocol-only messages. docs/supervisor-protocol.md embeds these; a test checks
    the document still matches, so the written protocol cannot drift from the code."""
    import dataclasses
    import typing

    from engine import events
    from engine.snapshot import section_schemas

    def field_schema(tp: Any) -> dict[str, Any]:
        origin = typing.get_origin(tp)
        simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
        if tp in simple:
            return {"type": simple[tp]}
        if origin is typing.Literal:
            return {"enum": list(typing.get_args(tp))}
        if origin is list:
            return {"type": "array"}
        if origin is dict:
            return {"type": "object"}
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:  # Optional[X]
            inner = field_schema(args[0])
            if "type" in inner:
                return {"type": [inner["type"], "null"]}
            return {"enum": [*inner["enum"], None]}
        raise TypeError(f"no JSON schema for {tp!r}")

    def message(name: str, required: list[str], props: dict[str, Any], *, with_id: bool) -> dict[str, Any]:
        base: dict[str, Any] = {"v": {"const": VERSION}, "type": {"const": name}}
        if with_id:
            base["id"] = {"type": ["string", "integer", "null"]}
        return {
            "$id": f"xswarm-supervisor/v{VERSION}/{name}",
            "type": "object",
            "required": ["v", "type", *required],
            "properties": {**base, **props},
            "additionalProperties": False,
        }

    out: dict[str, dict[str, Any]] = {}
    any_object = {"type": "object"}
    sections = section_schemas()
    out[AUTH] = message(
        AUTH, ["token"], {"token": {"type": "string"}, "name": {"type": ["string", "null"]}}, with_id=True
    )
    out[PING] = message(PING, [], {}, with_id=True)
    out[PONG] = message(PONG, ["id", "server_time"], {"server_time": {"type": "number"}}, with_id=True)
    out[SNAPSHOT] = {
        **message(
            SNAPSHOT,
            ["id", "you", "server_time", "opus", "node", "model", "calls", "recent_events", "system"],
            {
                "you": {
                    "type": "object",
                    "required": ["actor", "role"],
                    "properties": {"actor": {"type": "string"}, "role": {"enum": ["operator", "monitor"]}},
                },
                "server_time": {"type": "number"},
                "opus": {"type": "boolean"},
                "node": sections["node"],
                "model": sections["model"],
                "slots": sections["slots"],
                "calls": {"type": "array", "items": sections["call"]},
                "recent_events": {"type": "array", "items": any_object},
                "system": {"type": ["object", "null"]},
            },
            with_id=True,
        ),
        "additionalProperties": True,  # the runtime may add sections (scheduler, bridge …)
    }
    out[OK] = {
        **message(
            OK,
            ["id", "type_of"],
            {
                "type_of": {"type": "string"},
                "call_id": {"type": "string"},
                "mode": {"enum": list(get_args(Mode))},
                "operator": {"type": ["string", "null"]},
            },
            with_id=True,
        ),
        "additionalProperties": True,
    }
    out[ERROR] = {
        **message(
            ERROR,
            ["id", "error", "code"],
            {
                "error": {"type": "string"},
                "code": {"type": "string"},
                "type_of": {"type": "string"},
                "operator": {"type": ["string", "null"]},
            },
            with_id=True,
        ),
        "additionalProperties": False,
    }
    for name, cls in sorted(events._REGISTRY.items(), key=lambda item: (item[1].kind, item[0])):
        hints = typing.get_type_hints(cls, vars(events))
        fields = dataclasses.fields(cls)
        props = {f.name: field_schema(hints[f.name]) for f in fields}
        if issubclass(cls, Command):
            required = [
                f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            props.update({k: {"enum": list(CODECS)} for k in _COMMAND_OPTIONS.get(name, ())})
            out[name] = message(name, required, props, with_id=True)
        else:  # the server always sends every field of an event
            out[name] = message(name, [f.name for f in fields], props, with_id=False)
    return out
