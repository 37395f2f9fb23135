"""Property tests for every parser of outside input (issue 13).

Each parser is fed what hypothesis makes of its input space and must answer with its own
refusal (a clear error for the sender) or a result, never any other exception: the Twilio
media stream messages (``media``, ``start``, ``mark``, ``dtmf``, and anything else), the
multipart mail parser, the form parser, the call token, the supervisor protocol decoder
(also in test_supervisor_protocol.py) and the config file.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.bridge.server import BridgeServer, Refusal, TwilioStream
from engine.calls import CallRegistry
from engine.config import ConfigError, load_settings
from engine.events import EventBus
from engine.paths import Paths
from engine.supervisor import protocol as p
from engine.telephony.calltoken import TokenError, verify
from webhooks.body import parse_form
from webhooks.sendgrid_mail import MailFormatError, parse_inbound

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _field(name: str, value: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={name: value})


def twilio_messages() -> st.SearchStrategy[dict[str, Any]]:
    """Messages shaped like Twilio's, with every field free to be missing or of a wrong type."""
    sid = st.sampled_from(["CA" + "1" * 32, "MZ" + "2" * 32, "", "CA1"]) | st.text(max_size=40)
    start = st.fixed_dictionaries(
        {},
        optional={
            "streamSid": sid,
            "callSid": sid,
            "customParameters": st.dictionaries(st.sampled_from(["token", "user_id", "caller", "theme"]), json_values)
            | json_values,
            "mediaFormat": st.fixed_dictionaries(
                {},
                optional={
                    "encoding": st.sampled_from(["audio/x-mulaw", "audio/l16"]) | json_values,
                    "sampleRate": st.sampled_from([8000, "8000", 16000]) | json_values,
                    "channels": st.sampled_from([1, 2, "1"]) | json_values,
                },
            )
            | json_values,
        },
    )
    payload = st.binary(max_size=400).map(lambda b: __import__("base64").b64encode(b).decode()) | st.text(max_size=50)
    media = st.fixed_dictionaries({}, optional={"payload": payload | json_values, "track": st.text(max_size=12)})
    bodies = {
        "media": _field("media", media | json_values),
        "start": _field("start", start | json_values),
        "mark": _field("mark", st.fixed_dictionaries({}, optional={"name": st.text(max_size=12)}) | json_values),
        "dtmf": _field("dtmf", st.fixed_dictionaries({}, optional={"digit": st.text(max_size=3)}) | json_values),
    }
    return st.sampled_from([*bodies, "stop", "connected", "nonsense", None]).flatmap(
        lambda event: bodies.get(event, st.just({})).map(lambda body: {"event": event, **body})  # type: ignore[arg-type]
    )


class _Runtime:
    """What a ``TwilioStream`` reaches of the runtime: settings, bus, calls (no database)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.bus = EventBus()
        self.calls = CallRegistry(self.bus)
        self.calls.set_capacity(2)
        self.db = None
        self.model = object()


class _Socket:
    close_code = None


@pytest.fixture
def stream_factory(xswarm_home: Path) -> Any:
    settings = load_settings(telephony={"call_token_secret": "fuzz-secret-0123456789"})
    server = BridgeServer(_Runtime(settings))  # type: ignore[arg-type]
    return lambda: TwilioStream(server, _Socket())  # type: ignore[arg-type]


@FUZZ
@given(messages=st.lists(twilio_messages(), min_size=1, max_size=6))
def test_twilio_stream_messages_refuse_or_pass(stream_factory: Any, messages: list[dict[str, Any]]) -> None:
    stream = stream_factory()
    for message in messages:
        try:
            stream._on_message(json.dumps(message))
        except Refusal as refusal:
            assert 4000 <= refusal.code < 5000 and refusal.reason
            break
    assert stream.session is None  # no token this fuzzer can forge gets a call admitted


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_twilio_stream_raw_frames_refuse_or_pass(stream_factory: Any, raw: bytes) -> None:
    try:
        stream_factory()._on_message(raw)
    except Refusal:
        pass


@FUZZ
@given(token=st.text(max_size=300), call_sid=st.text(max_size=40))
def test_call_tokens_refuse_with_token_error(token: str, call_sid: str) -> None:
    with pytest.raises(TokenError):
        verify("fuzz-secret-0123456789", token, call_sid)


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


names = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)


@FUZZ
@given(
    parts=st.lists(
        st.tuples(
            st.sampled_from(["from", "to", "text", "html", "headers", "envelope", "email", "subject"]) | names,
            st.none() | names,
            st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
        ),
        max_size=5,
    ),
    boundary=st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=30),
    mangle=st.integers(min_value=0, max_value=3),
)
def test_multipart_mail_parser_refuses_or_parses(
    parts: list[tuple[str, str | None, bytes]], boundary: str, mangle: int
) -> None:
    body = _multipart(parts, boundary)
    if mangle == 1:
        body = body[: len(body) // 2]
    elif mangle == 2:
        body = body.replace(b"\r\n", b"\n")
    ctype = f"multipart/form-data; boundary={boundary}" if mangle != 3 else "multipart/form-data"
    try:
        fields, files = parse_inbound(ctype, body)
    except MailFormatError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    assert all(isinstance(data, bytes) for _, _, data in files)


@FUZZ
@given(raw=st.binary(max_size=500))
def test_multipart_mail_parser_on_garbage(raw: bytes) -> None:
    try:
        parse_inbound("multipart/form-data; boundary=x", raw)
    except MailFormatError:
        pass


@FUZZ
@given(
    raw=st.binary(max_size=500)
    | st.lists(st.tuples(names, st.text(max_size=20)), max_size=8).map(
        lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode()
    )
)
def test_form_parser_refuses_with_http_errors(raw: bytes) -> None:
    request = make_mocked_request("POST", "/twilio/sms", headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        form = parse_form(request, raw)
    except (web.HTTPBadRequest, web.HTTPRequestEntityTooLarge):
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())


@FUZZ
@given(raw=st.text(max_size=400) | json_values.map(json.dumps))
def test_supervisor_requests_refuse_with_protocol_error(raw: str) -> None:
    try:
        p.parse_request(raw)
    except p.ProtocolError:
        pass


toml_keys = st.sampled_from(
    ["server", "model", "twilio", "telephony", "supervisor", "s3", "ui", "llm", "nonsense"]
).flatmap(
    lambda section: st.tuples(
        st.just(section),
        st.sampled_from(["host", "bridge_port", "name", "slots", "token", "unknown_callers", "bucket", "theme", "x"])
        | names,
    )
)
toml_values = (
    st.integers(min_value=-(2**40), max_value=2**40).map(str)
    | st.text(alphabet=string.printable, max_size=30).map(lambda t: json.dumps(t))
    | st.sampled_from(["true", "[1, 2]", "{a = 1}", "1.5", "nan", "="])
)


@FUZZ
@given(
    entries=st.lists(st.tuples(toml_keys, toml_values), max_size=6),
    garbage=st.text(max_size=60) | st.just(""),
)
def test_config_files_load_or_raise_config_error(
    tmp_path_factory: pytest.TempPathFactory, entries: list[tuple[tuple[str, str], str]], garbage: str
) -> None:
    root = tmp_path_factory.mktemp("cfg")
    paths = Paths(root / "config", root / "data", root / "state", root / "cache")
    paths.config.mkdir(parents=True)
    lines = []
    for (section, key), value in entries:
        lines.append(f"[{section}]\n{key} = {value}")
    paths.config_file.write_text("\n".join(lines) + "\n" + garbage, encoding="utf-8")
    try:
        load_settings(paths)
    except ConfigError as exc:
        assert str(exc)
