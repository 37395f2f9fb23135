"""The Twilio Media Streams wire format: reading what Twilio sends, writing what we send back.

Only the shape of the JSON messages lives here (which fields a message must carry, how audio
is encoded); what they mean (admission, tokens, jitter buffers, playout lag) is the
transport's business (``engine/bridge/server.py``). A message that is not what Twilio sends
raises ``WireError`` with a counter key and a reason, which the transport turns into closing
that one stream.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

SID = re.compile(r"[A-Za-z0-9_-]{1,64}")
DIGITS = frozenset("0123456789*#ABCD")
INBOUND_TRACKS = ("inbound", "inbound_track")

_encode = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON, one encoder for every message (``json.dumps`` with options builds a new one
per call)."""


class WireError(ValueError):
    """Not a message Twilio sends: ``key`` names the refusal counter, ``reason`` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key, self.reason = key, reason


# ------------------------------------------------------------------------------- inbound


def decode(raw: str | bytes) -> tuple[Any, dict[str, Any]]:
    """One message as (its ``event``, the whole object)."""
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise WireError("malformed_json", "malformed JSON") from None
    if not isinstance(msg, dict):
        raise WireError("malformed_json", "message is not a JSON object")
    return msg.get("event"), msg


def media(msg: dict[str, Any]) -> tuple[bytes, str]:
    """A ``media`` message's mu-law audio and its track (``inbound`` when not given)."""
    body = msg.get("media")
    if not isinstance(body, dict) or not isinstance(body.get("payload"), str):
        raise WireError("malformed_media", "media without a payload")
    try:
        audio = base64.b64decode(body["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise WireError("malformed_base64", "media payload is not base64") from None
    track = body.get("track", "inbound")
    return audio, track if isinstance(track, str) else ""


def mark_name(msg: dict[str, Any]) -> str | None:
    """The name of an echoed ``mark``; None when it has none."""
    mark = msg.get("mark")
    name = mark.get("name") if isinstance(mark, dict) else None
    return name if isinstance(name, str) else None


def dtmf_digit(msg: dict[str, Any]) -> str | None:
    """The key a ``dtmf`` message reports; None when it is not a telephone key."""
    dtmf = msg.get("dtmf")
    digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
    return digit if isinstance(digit, str) and digit in DIGITS else None


@dataclass(frozen=True)
class Start:
    """A ``start`` message whose stream and call ids are valid; the rest is checked on demand,
    in the order the transport needs (the ids first, so a refusal can name the call)."""

    stream_sid: str
    call_sid: str
    media_format: object
    custom_parameters: object

    def check_format(self) -> None:
        """8 kHz mono mu-law, the only format a bidirectional stream carries."""
        fmt = self.media_format
        if (
            not isinstance(fmt, dict)
            or fmt.get("encoding") != "audio/x-mulaw"
            or str(fmt.get("sampleRate")) != "8000"
            or str(fmt.get("channels", 1)) != "1"
        ):
            raise WireError("bad_media_format", "media format must be audio/x-mulaw 8000 Hz mono")

    def parameters(self) -> dict[str, Any]:
        """The TwiML ``<Parameter>``s (empty when there are none)."""
        params = self.custom_parameters or {}
        if not isinstance(params, dict):
            raise WireError("malformed_start", "customParameters is not an object")
        return params


def start(msg: dict[str, Any]) -> Start:
    body = msg.get("start")
    if not isinstance(body, dict):
        raise WireError("malformed_start", "start without a start object")
    stream_sid = body.get("streamSid") or msg.get("streamSid")
    call_sid = body.get("callSid")
    if not (
        isinstance(stream_sid, str)
        and SID.fullmatch(stream_sid)
        and isinstance(call_sid, str)
        and SID.fullmatch(call_sid)
    ):
        raise WireError("malformed_start", "start without valid streamSid/callSid")
    return Start(stream_sid, call_sid, body.get("mediaFormat"), body.get("customParameters"))


# ------------------------------------------------------------------------------ outbound


class MediaWriter:
    """Audio messages for one stream, 200 a second per call: the JSON around the payload is
    encoded once per stream, and each message only places the payload inside it (base64's
    alphabet needs no JSON escaping)."""

    __slots__ = ("_head", "_tail")

    def __init__(self, stream_sid: str) -> None:
        template = _encode({"event": "media", "streamSid": stream_sid, "media": {"payload": ""}})
        self._head, _, self._tail = template.rpartition('""')

    def message(self, ulaw: bytes) -> str:
        """One chunk of mu-law for the caller."""
        return f'{self._head}"{base64.b64encode(ulaw).decode()}"{self._tail}'


def mark_message(stream_sid: str, name: str) -> str:
    """A mark Twilio echoes once the audio sent before it has been played (one per frame, so
    the two strings are quoted by json's C string encoder rather than the whole encoder)."""
    return f'{{"event":"mark","streamSid":{_quote(stream_sid)},"mark":{{"name":{_quote(name)}}}}}'


def clear_message(stream_sid: str) -> str:
    """Drop the audio Twilio has buffered but not played."""
    return _encode({"event": "clear", "streamSid": stream_sid})
