"""`xswarm webhooks serve --workers N`: processes sharing one port, one database and one log."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fixtures.sqld import free_port
from webhooks_support import serve_cli, twilio_post

from webhooks.limits import RateLimit
from webhooks.workers import WorkerPlan

SENDER = "+14155550123"


@pytest.fixture
def two_workers(xswarm_home: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    proc = serve_cli(port, "--workers", "2")
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert f"listening on http://127.0.0.1:{port} (2 workers" in line, line + (
            proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        )
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def health(port: int) -> dict[str, Any]:
    """One request on a fresh connection (the kernel picks the worker per connection)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def workers_answering(port: int, tries: int = 200) -> set[str]:
    seen: set[str] = set()
    for _ in range(tries):
        seen.add(health(port)["worker"])
        if len(seen) == 2:
            break
    return seen


def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_workers_share_the_port_and_apply_each_sms_once(
    two_workers: tuple[subprocess.Popen[str], int], xswarm_home: Path
) -> None:
    proc, port = two_workers
    assert workers_answering(port) == {"1/2", "2/2"}
    for i in range(40):
        params = {
            "MessageSid": f"SMw{i:03d}",
            "From": SENDER,
            "To": "+14155550199",
            "Body": "help",
            "AccountSid": "AC0123",
        }
        body, headers = twilio_post(params, "/twilio/sms")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/twilio/sms", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200 and b"<Response>" in resp.read()
    until(lambda: health(port)["inbox"]["done"] == 40)
    conn = sqlite3.connect(xswarm_home / "data" / "xswarm.db")
    try:
        inbound = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT provider_id) FROM messages WHERE direction = 'in'"
        ).fetchone()
        replies = conn.execute("SELECT COUNT(*) FROM messages WHERE provider_id LIKE 'reply:%'").fetchone()
    finally:
        conn.close()
    assert inbound == (40, 40)  # each SMS applied once, whichever worker's processor took it
    assert replies == (40,)
    log = (xswarm_home / "state" / "logs" / "xswarm.log").read_text()
    assert "webhooks worker 1/2 listening" in log and "webhooks worker 2/2 listening" in log  # through the parent


def test_a_dead_worker_is_replaced_and_sigterm_stops_all(two_workers: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = two_workers
    parent = psutil.Process(proc.pid)
    children = parent.children()
    assert len(children) >= 2
    workers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    victim = workers[0]
    victim.kill()
    victim.wait(10)
    until(
        lambda: (
            len(
                [
                    c
                    for c in parent.children()
                    if c.pid != victim.pid and "resource_tracker" not in " ".join(c.cmdline())
                ]
            )
            == 2
        )
    )
    until(lambda: workers_answering(port) == {"1/2", "2/2"})
    remaining = parent.children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs(remaining, timeout=10)
    assert not alive


def test_workers_refuse_a_taken_port_clearly(xswarm_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = serve_cli(taken.getsockname()[1], "--workers", "2")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "cannot listen on 127.0.0.1" in err and "Traceback" not in err


def test_each_worker_gets_its_share_of_the_rate_limit() -> None:
    plan = WorkerPlan("127.0.0.1", 8787, 4, RateLimit(500.0, 1000.0))
    assert plan.share() == RateLimit(125.0, 250.0)
    assert WorkerPlan("127.0.0.1", 8787, 4, None).share() is None
