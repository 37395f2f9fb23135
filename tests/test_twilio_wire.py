"""The Twilio Media Streams wire format (engine/bridge/twilio_wire.py), apart from the transport."""

from __future__ import annotations

import base64
import json

import pytest

from engine.bridge import twilio_wire as wire

SID = "MZ" + "b" * 32


def test_outbound_messages_are_the_json_twilio_expects() -> None:
    chunk = bytes(range(160))
    assert json.loads(wire.MediaWriter(SID).message(chunk)) == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": base64.b64encode(chunk).decode()},
    }
    assert json.loads(wire.mark_message(SID, "f:7")) == {"event": "mark", "streamSid": SID, "mark": {"name": "f:7"}}
    assert json.loads(wire.clear_message(SID)) == {"event": "clear", "streamSid": SID}


def test_outbound_json_escapes_what_it_carries() -> None:
    odd = 'MZ"},"event":"stop'
    assert json.loads(wire.MediaWriter(odd).message(b"\xff"))["streamSid"] == odd
    assert json.loads(wire.mark_message(odd, 'a"b'))["mark"] == {"name": 'a"b'}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("{", "malformed_json"),
        ("[1]", "malformed_json"),
        ('{"event":"media","media":{}}', "malformed_media"),
        ('{"event":"media","media":{"payload":"***"}}', "malformed_base64"),
        ('{"event":"start"}', "malformed_start"),
        ('{"event":"start","start":{"streamSid":"MZ1","callSid":"bad sid"}}', "malformed_start"),
    ],
)
def test_malformed_messages_name_their_refusal(raw: str, key: str) -> None:
    with pytest.raises(wire.WireError) as info:
        event, msg = wire.decode(raw)
        {"media": wire.media, "start": wire.start}[event](msg)
    assert info.value.key == key


def test_start_checks_format_and_parameters_on_demand() -> None:
    start = wire.start(
        {
            "event": "start",
            "start": {
                "streamSid": SID,
                "callSid": "CA1",
                "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 8000, "channels": 1},
                "customParameters": ["token"],
            },
        }
    )
    assert (start.stream_sid, start.call_sid) == (SID, "CA1")
    with pytest.raises(wire.WireError, match="audio/x-mulaw") as info:
        start.check_format()
    assert info.value.key == "bad_media_format"
    with pytest.raises(wire.WireError, match="customParameters"):
        start.parameters()


def test_inbound_fields() -> None:
    audio, track = wire.media({"media": {"payload": base64.b64encode(b"\x7f" * 160).decode(), "track": "outbound"}})
    assert audio == b"\x7f" * 160 and track not in wire.INBOUND_TRACKS
    assert wire.mark_name({"mark": {"name": "f:1"}}) == "f:1" and wire.mark_name({"mark": 3}) is None
    assert wire.dtmf_digit({"dtmf": {"digit": "#"}}) == "#" and wire.dtmf_digit({"dtmf": {"digit": "x"}}) is None
