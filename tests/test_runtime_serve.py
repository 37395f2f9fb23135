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

import psutil

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


def _listener_pid(port: int) -> int | None:
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def test_serve_runs_the_webhooks_in_a_child_process_and_restarts_it() -> None:
    """Contract (issue 13): with ``--webhooks-port N`` the process listening on N is not the
    process that runs the bridge, so hostile webhook traffic never shares the voice tick's loop
    and GIL. The child is watched: killed, it comes back; and it stops with the node."""
    bridge, hooks = free_port(), free_port()
    proc = xswarm(
        "serve",
        "--model",
        "echo",
        "--bridge-port",
        str(bridge),
        "--supervisor-port",
        "0",
        "--webhooks-port",
        str(hooks),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        assert f"webhooks   http://127.0.0.1:{hooks} (child process" in "".join(lines), lines
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{hooks}/health", timeout=5).read())
        assert health["status"] == "ok"
        child = _listener_pid(hooks)
        assert child is not None and child != proc.pid and _listener_pid(bridge) == proc.pid
        assert psutil.Process(child).ppid() == proc.pid
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 60
        restarted = None
        while time.monotonic() < deadline and restarted in (None, child):
            time.sleep(0.2)
            restarted = _listener_pid(hooks)
        assert restarted not in (None, child, proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert not psutil.pid_exists(restarted) or psutil.Process(restarted).status() == psutil.STATUS_ZOMBIE
