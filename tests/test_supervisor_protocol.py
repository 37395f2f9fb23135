"""Protocol v1 frames and the written protocol (docs/supervisor-protocol.md).

The document's schemas must equal ``protocol.schemas()``; run this file with
``UPDATE_SUPERVISOR_DOCS=1`` to rewrite that section after changing a message.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.events import CallStarted, Command, Listen, TakeOver, Whisper, message
from engine.snapshot import LiveCall, ModelInfo, NodeInfo, SlotInfo, Snapshot
from engine.supervisor import protocol as p

DOC = Path(__file__).resolve().parents[1] / "docs" / "supervisor-protocol.md"
BEGIN, END = "<!-- schemas:begin -->", "<!-- schemas:end -->"


def render_schemas() -> str:
    parts = []
    for name, schema in p.schemas().items():
        direction = {
            p.AUTH: "client → server",
            p.PING: "client → server",
            p.PONG: "server → client",
            p.SNAPSHOT: "server → client",
            p.OK: "server → client",
            p.ERROR: "server → client",
        }.get(name)
        if direction is None:
            direction = "client → server (command)" if name in p.COMMAND_ALIASES.values() else "server → client (event)"
        parts.append(f"### `{name}` — {direction}\n\n```json\n{_compact(schema)}\n```\n")
    return "\n".join(parts)


def _compact(schema: dict) -> str:
    """One line per top-level key and per property: readable, and short enough to scan."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in schema.items() if k != "properties"]
    props = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in schema["properties"].items()]
    lines.append('  "properties": {\n' + ",\n".join(props) + "\n  }")
    return "{\n" + ",\n".join(lines) + "\n}"


def doc_schemas(text: str) -> dict[str, dict]:
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    found = {}
    for name, body in re.findall(r"### `([^`]+)`[^\n]*\n\n```json\n(.*?)\n```", section, re.S):
        found[name] = json.loads(body)
    return found


def test_document_matches_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    if os.environ.get("UPDATE_SUPERVISOR_DOCS"):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = f"{head}{BEGIN}\n\n{render_schemas()}\n{END}{tail}"
        DOC.write_text(text, encoding="utf-8")
    assert doc_schemas(text) == p.schemas(), "docs/supervisor-protocol.md is stale: rerun with UPDATE_SUPERVISOR_DOCS=1"
    assert "version 1" in text.splitlines()[0]


def test_real_messages_validate_against_the_schemas() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = p.schemas()

    def check(message: dict) -> None:
        jsonschema.validate(message, schemas[message["type"]])

    check(CallStarted(call_id="CA1", slot=0, source="twilio").to_wire())
    check({**Listen("CA1").to_wire(), "id": 3, "codec": "opus"})
    check(json.loads(p.ok_frame("1", type_of="TakeOver", call_id="CA1", mode="operator", operator="a#1")))
    check(json.loads(p.error_frame(None, "not valid JSON", code="bad_request")))
    with pytest.raises(jsonschema.ValidationError):
        check({**TakeOver("CA1").to_wire(), "extra": True})
    snapshot = Snapshot(
        node=NodeInfo("node-1", bridge_port=9998),
        model=ModelInfo("auto", "echo", "ready", facts={"model": "echo", "slots": 4}),
        slots=SlotInfo(total=4, used=1, free=3, available=3),
        calls=[LiveCall("CA1", slot=0, mode="operator", operator="ops", bal_ms={"p50": 12.5, "p99": None})],
    ).to_wire()
    you = {"actor": "ops", "role": "operator"}
    check(
        {
            "v": 1,
            "type": "snapshot",
            "id": None,
            "you": you,
            "server_time": 1.0,
            "opus": False,
            "system": None,
            **snapshot,
        }
    )
    with pytest.raises(jsonschema.ValidationError):
        check(
            {
                "v": 1,
                "type": "snapshot",
                "id": None,
                "you": you,
                "server_time": 1.0,
                "opus": False,
                "system": None,
                **snapshot,
                "calls": [{"call_id": "CA1", "mode": "shouting"}],
            }
        )


def test_parse_accepts_class_names_and_aliases() -> None:
    a = p.parse_request('{"v":1,"type":"takeover","id":1,"call_id":"CA1"}')
    b = p.parse_request('{"v":1,"type":"TakeOver","id":"x","call_id":"CA1"}')
    assert a.command == b.command == TakeOver("CA1") and (a.id, b.id) == (1, "x")
    w = p.parse_request(json.dumps({"v": 1, "type": "whisper", "id": 2, "call_id": "CA1", "text": "hello"}))
    assert w.command == Whisper("CA1", "hello")
    listen = p.parse_request('{"v":1,"type":"listen","call_id":"CA1","codec":"opus"}')
    assert listen.command == Listen("CA1") and listen.body == {"codec": "opus"} and listen.id is None


@pytest.mark.parametrize(
    "raw, words",
    [
        ("", "not valid JSON"),
        ("null", "JSON object"),
        ('{"v":1,"type":"mute","id":true,"call_id":"CA1"}', "id must be"),
        ('{"v":1,"type":"mute","id":[1],"call_id":"CA1"}', "id must be"),
        ('{"type":"mute","call_id":"CA1"}', "version"),
        ('{"v":1,"type":7}', "type must be"),
        ('{"v":1,"type":"CallEnded","call_id":"x","reason":"r","duration_s":1}', "is an event"),
        ('{"v":1,"type":"mute","call_id":""}', "call_id"),
        ('{"v":1,"type":"whisper","call_id":"CA1","text":["a"]}', "text must be"),
        ('{"v":1,"type":"mute","call_id":"' + "x" * 300 + '"}', "call_id"),
    ],
)
def test_parse_rejects_with_a_reason(raw: str, words: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse_request(raw)
    assert words in str(info.value)


def test_audio_frame_round_trip() -> None:
    pcm = np.linspace(-1, 1, 1920, dtype=np.float32)
    frame = p.AudioFrame("CA" + "é" * 10, "ai", "pcm16", 2**32 + 5, 1_700_000_000.125, p.pcm16_bytes(pcm))
    back = p.AudioFrame.unpack(frame.pack())
    assert back.call_id == frame.call_id and back.direction == "ai" and back.codec == "pcm16"
    assert back.seq == 5 and back.captured_at == 1_700_000_000.125  # the u32 sequence wraps
    assert np.allclose(p.pcm16_to_float(back.payload), pcm, atol=1e-4)
    assert len(frame.pack()) == 16 + len(frame.call_id.encode()) + 3840


def test_pcm16_clips_instead_of_wrapping() -> None:
    loud = np.array([2.0, -2.0, 0.5], np.float32)
    assert np.allclose(p.pcm16_to_float(p.pcm16_bytes(loud)), [32767 / 32768, -32767 / 32768, 0.5], atol=1e-4)


@given(st.binary(max_size=64))
def test_garbage_audio_frames_raise_protocol_error_only(data: bytes) -> None:
    try:
        frame = p.AudioFrame.unpack(data)
    except p.ProtocolError:
        return
    assert frame.direction in p.DIRECTIONS and frame.codec in p.CODECS


@given(st.text(max_size=200))
def test_garbage_text_raises_protocol_error_only(text: str) -> None:
    try:
        p.parse_request(text)
    except p.ProtocolError:
        pass


def test_pcm16_limits() -> None:
    with pytest.raises(p.ProtocolError):
        p.pcm16_to_float(b"\x00" * 3)
    with pytest.raises(p.ProtocolError):
        p.pcm16_to_float(b"\x00" * (2 * p.MAX_AUDIO_SAMPLES + 2))


async def test_client_forgets_a_calls_codec_state_when_it_ends() -> None:
    """Operator streams, decoders and listens of ended calls must not pile up in a long session."""
    from engine.events import CallEnded
    from engine.supervisor.client import SupervisorClient

    client = SupervisorClient("ws://127.0.0.1:9/", "token")
    for call in ("CA1", "CA2"):
        client._streams[call] = p.AudioStream(call, "operator", "pcm16")
        client._decoders[(call, "caller")] = p.OpusDecoder()
        client._listening[call] = "opus"
    await client._on_text(json.dumps(CallEnded("CA1", "hung up", 12.0).to_wire()))
    assert list(client._streams) == ["CA2"] and list(client._listening) == ["CA2"]
    assert list(client._decoders) == [("CA2", "caller")]
    assert isinstance(await client.next_message(1), CallEnded)  # still delivered


def test_a_command_names_its_action() -> None:
    """Checked when the type is declared, before it is registered (the protocol never sees it)."""
    with pytest.raises(TypeError, match="action"):

        @message
        class Nameless(Command):
            call_id: str

    assert "Nameless" not in p.schemas()
