"""Supervisor token rotation on a running node: add a token, move the consoles, retire the old one.

Black box: a real ``xswarm serve`` process, the real CLI commands an operator types, and real
WebSocket consoles. The node is never restarted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from engine.config import load_settings
from engine.supervisor.auth import AuthConfigError, fingerprint, load_tokens, token_file
from engine.supervisor.tokens import add, entries, retire
from tests.fixtures.sqld import free_port

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xswarm_tui.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=os.environ.copy(),
    )


def console(stack: ExitStack, port: int, token: str) -> ClientConnection:
    """A logged-in console (closed when ``stack`` closes); raises InvalidStatus when refused."""
    ws = stack.enter_context(
        connect(f"ws://127.0.0.1:{port}/", additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=5)
    )
    assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"
    return ws


def closed_with(ws: ClientConnection, timeout: float) -> int | None:
    """Read until the server closes the socket (its close code) or ``timeout`` passes (None)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                ws.recv(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                return None
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    return None


@pytest.fixture
def node() -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xswarm_tui.cli", "serve", "--model", "echo", "--bridge-port", "0"]
        + ["--supervisor-port", str(port), "--webhooks-port", "0"],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "the node did not start"
            time.sleep(0.1)
    yield proc, port
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_rotate_the_operator_token_without_restarting_the_node(node: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = node
    stack = ExitStack()
    with stack:
        rotate(stack, port)
    assert proc.poll() is None  # never restarted


def rotate(stack: ExitStack, port: int) -> None:
    old = cli("supervisor", "token").stdout.strip()
    first = console(stack, port, old)

    added = cli("supervisor", "add-token")
    assert added.returncode == 0, added.stderr
    new = added.stdout.strip()
    assert len(new) >= 32 and new != old
    deadline = time.monotonic() + 5
    while True:  # the node takes the new file in within its poll
        try:
            second = console(stack, port, new)
            break
        except InvalidStatus:
            assert time.monotonic() < deadline, "the new token was never accepted"
            time.sleep(0.2)
    assert cli("supervisor", "token").stdout.strip() == new  # new consoles get the newest
    listed = cli("supervisor", "tokens", "--json")
    operator = [e for e in json.loads(listed.stdout) if e["role"] == "operator"]
    assert [(e["fingerprint"], e["newest"]) for e in operator] == [(fingerprint(old), False), (fingerprint(new), True)]
    assert old not in listed.stdout and new not in listed.stdout

    retired = cli("supervisor", "retire-token", fingerprint(old)[:8])
    assert retired.returncode == 0 and f"retired operator token {fingerprint(old)}" in retired.stdout
    assert closed_with(first, 5) == 4401  # the console on the retired token is closed
    assert closed_with(second, 1.5) is None  # the moved one stays
    with pytest.raises(InvalidStatus) as refused:
        console(stack, port, old)
    assert refused.value.response.status_code == 401

    last = cli("supervisor", "retire-token", fingerprint(new))
    assert last.returncode == 1 and "only operator token" in last.stderr


def test_the_token_file_accepts_a_list_per_role() -> None:
    settings = load_settings()
    first = load_tokens(settings)
    token = add(settings, "monitor")
    tokens = load_tokens(settings)
    assert tokens.monitor == token and tokens.valid("monitor") == (first.monitor, token)
    assert tokens.operator == first.operator and token_file().stat().st_mode & 0o777 == 0o600
    retire(settings, fingerprint(first.monitor))
    assert load_tokens(settings).valid("monitor") == (token,)
    assert [e.role for e in entries(settings)] == ["operator", "monitor"]


def test_rotation_refuses_what_it_cannot_do(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    load_tokens(settings)
    with pytest.raises(AuthConfigError, match="at least 4"):
        retire(settings, "ab")
    with pytest.raises(AuthConfigError, match="no supervisor token"):
        retire(settings, "zzzzzzzz")
    monkeypatch.setenv("XSWARM_SUPERVISOR_TOKEN", "operator-token-from-the-environment")
    with pytest.raises(AuthConfigError, match="XSWARM_SUPERVISOR_TOKEN"):
        add(load_settings(), "operator")
