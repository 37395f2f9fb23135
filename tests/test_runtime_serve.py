"""``xswarm serve``: the headless runtime as an operator starts and stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def xswarm(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xswarm_tui.cli", *args],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_runs_the_bridge_headless_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = xswarm(
        "serve", "--model", "echo", "--bridge-port", str(port), "--supervisor-port", "0", "--webhooks-port", "0"
    )
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and health is None:
            try:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read())
                if health["status"] != "ok":
                    health = None
            except OSError:
                pass
            time.sleep(0.1)
        assert health is not None and health["model"] == "echo"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"bridge     ws://127.0.0.1:{port}" in out and "supervisor off" in out and "stopping" in out
    assert err == ""  # engine code never prints; logs go to the file


def test_serve_refuses_an_unknown_model_with_exit_2() -> None:
    proc = xswarm("serve", "--model", "nonsense", "--bridge-port", "0", "--supervisor-port", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "unknown model" in err
