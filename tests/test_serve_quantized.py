"""`xswarm serve --model synthetic:tiny` with int8 weights and an int8 KV cache, end to end:
settings from the environment, the model reports its precision when ready, and a simulated
Twilio call gets audio back through the bridge."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from engine.audio import mulaw
from engine.bridge.simulator import StreamTarget, stream_call

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_serve_synthetic_tiny_with_quantized_weights_and_kv_cache(xswarm_home: object, kv: str) -> None:
    port = free_port()
    env = os.environ | {
        "XSWARM_MODEL__WEIGHTS": "int8",
        "XSWARM_MODEL__KV_CACHE": kv,
        "XSWARM_MODEL__CONTEXT": "64",
        "XSWARM_MODEL__DEVICE": "cpu",
        "XSWARM_MODEL__SLOTS": "2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "xswarm_tui.cli", "serve", "--model", "synthetic:tiny"]
        + ["--bridge-port", str(port), "--supervisor-port", "0", "--webhooks-port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        health = None
        while time.monotonic() < deadline and health is None:
            assert proc.poll() is None, proc.communicate()
            try:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read())
                if health["status"] != "ok":
                    health = None
            except OSError:
                pass
            time.sleep(0.2)
        assert health is not None and health["model"] == "synthetic:tiny"
        t = np.arange(8000 * 2) / 8000
        audio = bytes(mulaw.encode((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)))
        report = asyncio.run(stream_call(StreamTarget(f"ws://127.0.0.1:{port}/twilio"), audio, tail_s=1.0))
        assert report.chunks_received > 0, report
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"model synthetic:tiny: ready - synthetic:tiny: 2 slots, weights int8, kv cache {kv}" in out, out
