"""``xswarm call`` end to end: signed voice webhook -> TwiML -> signed upgrade -> echo -> reply WAV."""

from __future__ import annotations

import json
import socket
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.config import load_settings
from engine.runtime import Runtime

AUTH_TOKEN = "cli-test-auth-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(monkeypatch: pytest.MonkeyPatch, bridge_public_url: str | None = None) -> Runtime:
    bridge_port, webhooks_port = free_port(), free_port()
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "3" * 32)
    monkeypatch.setenv("XSWARM_CALL_TOKEN_SECRET", "cli-test-token-secret")
    monkeypatch.setenv("XSWARM_BRIDGE_PUBLIC_URL", bridge_public_url or f"ws://127.0.0.1:{bridge_port}")
    monkeypatch.setenv("XSWARM_SERVER__BRIDGE_PORT", str(bridge_port))  # the node's own settings
    monkeypatch.setenv("XSWARM_TELEPHONY__UNKNOWN_CALLERS", "guest")
    monkeypatch.setenv("XSWARM_TWILIO__API_BASE_URL", "http://127.0.0.1:9")  # never reached in these calls
    runtime = Runtime(
        load_settings(), model_spec="echo", bridge_port=bridge_port, supervisor_port=0, webhooks_port=webhooks_port
    )
    runtime.start()
    deadline = time.monotonic() + 10
    while runtime.calls.capacity == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the node row's first heartbeat lands
    return runtime


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    runtime = start_node(monkeypatch)
    yield runtime
    runtime.stop()


@pytest.fixture
def public_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A node as deployed behind a TLS proxy: both public URLs set, neither reachable here."""
    monkeypatch.setenv("XSWARM_PUBLIC_URL", "https://hooks.example.com")
    runtime = start_node(monkeypatch, "wss://voice.example.com")
    yield runtime
    runtime.stop()


def invoke(*args: str) -> tuple[int, str]:
    from xswarm_tui.cli import app

    result = CliRunner().invoke(app, ["call", *args])
    return result.exit_code, result.output


def write_wav(path: Path, rate: int, channels: int, seconds: float) -> np.ndarray:
    n = int(rate * seconds)
    rng = np.random.default_rng(5)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < 300) | (freqs > 3000)] = 0
    x = np.fft.irfft(spectrum, n)
    x = 0.4 * x / np.abs(x).max()
    pcm = (np.repeat(x[:, None], channels, axis=1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(channels)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(pcm.tobytes())
    return x


def test_call_through_the_voice_webhook_and_the_bridge(node: Runtime, tmp_path: Path) -> None:
    wav = tmp_path / "hello.wav"
    write_wav(wav, 44100, 2, 2.0)
    out = tmp_path / "reply.wav"
    code, output = invoke(str(wav), "--webhooks", f"http://127.0.0.1:{node.webhooks_port}", "--json", "--out", str(out))
    assert code == 0, output
    report = json.loads(output)
    assert report["url"] == f"ws://127.0.0.1:{node.bridge_port}/twilio"  # followed the TwiML
    assert report["close_code"] == 1000 and report["chunks_sent"] == 100 + 25
    assert report["chunks_received"] >= 100 and report["marks_echoed"] >= 25
    # our own voice came back: one frame of echo (80 ms), frame accumulation (80 ms, less the
    # 20 ms chunk the first sample starts), resamplers (2.9 ms), then the tick wait
    assert report["echo_delay_ms"] is not None and 142 <= report["echo_delay_ms"] <= 300
    with wave.open(str(out), "rb") as wf:
        assert wf.getframerate() == 8000 and wf.getnchannels() == 1
        assert abs(wf.getnframes() - report["chunks_received"] * 160) == 0
    assert node.bridge.refusals == {}  # the signature and the one-time token were accepted


def test_several_calls_straight_to_the_bridge_with_minted_tokens(node: Runtime) -> None:
    code, output = invoke(
        "--bridge", f"ws://127.0.0.1:{node.bridge_port}", "--calls", "3", "--stagger", "0.05", "--tail", "0.2", "--json"
    )
    assert code == 0, output
    reports = json.loads(output)
    assert len(reports) == 3 and len({r["call_sid"] for r in reports}) == 3
    assert all(r["close_code"] == 1000 and r["chunks_received"] > 0 for r in reports)


def test_a_refused_webhook_call_is_reported(node: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = invoke("--webhooks", f"http://127.0.0.1:{node.webhooks_port}", "--auth-token", "wrong-token")
    assert code == 1 and "call failed" in output and "voice webhook answered 403" in output


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    assert invoke("--calls", "0")[0] == 2
    assert invoke("--param", "novalue")[0] == 2
    missing = tmp_path / "missing.wav"
    code, output = invoke(str(missing))
    assert code == 2 and "cannot read" in output


def test_call_reaches_a_node_with_public_urls_and_the_caller_is_recorded(public_node: Runtime) -> None:
    """Issue 13: the simulator signs what Twilio would have signed (the public URLs from the
    settings) while it connects to the addresses given; and the caller's number reaches the
    ``calls`` row (it used to be NULL for every Twilio call)."""
    code, output = invoke(
        "--webhooks", f"http://127.0.0.1:{public_node.webhooks_port}", "--from", "+15551230001", "--json"
    )
    assert code == 0, output
    report = json.loads(output)
    assert report["close_code"] == 1000 and report["chunks_received"] > 0
    assert report["url"] == f"ws://127.0.0.1:{public_node.bridge_port}/twilio"
    assert public_node.bridge.refusals == {}
    assert public_node.db is not None
    deadline = time.monotonic() + 5
    rows: list[tuple[str, str | None]] = []
    while time.monotonic() < deadline and not rows:
        rows = public_node.db.query("SELECT id, caller FROM calls WHERE id = ?", (report["call_sid"],))
        time.sleep(0.05)
    assert [row[1] for row in rows] == ["+15551230001"]
