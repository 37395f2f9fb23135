"""``xswarm doctor --network`` against a real TLS server on 127.0.0.1, and on a box with no network.

The provider's base URL is pointed at a local server with a certificate this test made; the
check must complete a verified handshake and send nothing after it. "No network" is real too:
the CLI runs in a fresh network namespace (``unshare``), which has no route anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tls_support import write_certificate

from engine.config import load_settings
from engine.doctor.network import check_network

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TlsServer:
    """Accepts TLS connections on 127.0.0.1 and records what each client sent after the handshake."""

    cert: Path
    key: Path
    port: int = 0
    handshakes: int = 0
    received: bytearray = field(default_factory=bytearray)
    closed: threading.Event = field(default_factory=threading.Event)
    """Set when a client's connection has been read to its end."""

    def __post_init__(self) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.cert, self.key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        self.handshakes += 1
                        while chunk := tls.recv(4096):
                            self.received += chunk
                except (OSError, ssl.SSLError):
                    pass
                self.closed.set()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TlsServer]:
    cert, key = write_certificate(tmp_path)
    srv = TlsServer(cert, key)
    yield srv
    srv.close()


def test_a_verified_handshake_and_nothing_sent_after_it(server: TlsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(server.cert))
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "1" * 32)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "the-secret-auth-token")
    monkeypatch.setenv("XSWARM_TWILIO__API_BASE_URL", f"https://localhost:{server.port}")
    checks = {c.name: c for c in check_network(load_settings(), is_online=lambda: False, timeout=5)}
    twilio = checks["network-twilio"]
    assert twilio.status == "pass", twilio
    assert f"localhost:{server.port} TLSv1." in twilio.detail and "handshake in" in twilio.detail
    server.closed.wait(timeout=5)  # the server side finishes its handshake and reads to the close
    assert server.handshakes == 1
    assert bytes(server.received) == b""  # no request, no header, no token
    others = {name: c for name, c in checks.items() if name != "network-twilio"}
    assert {c.status for c in others.values()} == {"skip"}
    assert {c.detail for c in others.values()} == {"skipped: not configured"}


def test_an_untrusted_certificate_fails_with_the_reason(server: TlsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDGRID_API_KEY", "SG.secret")
    monkeypatch.setenv("XSWARM_SENDGRID__API_BASE_URL", f"https://localhost:{server.port}")
    check = next(c for c in check_network(load_settings(), timeout=5) if c.name == "network-sendgrid")
    assert check.status == "fail" and "certificate not trusted" in check.detail and "SSL_CERT_FILE" in check.fix


def test_a_closed_port_fails_at_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret")
        monkeypatch.setenv("XSWARM_LLM__ANTHROPIC_BASE_URL", f"https://127.0.0.1:{port}")
        check = next(c for c in check_network(load_settings(), timeout=2) if c.name == "network-anthropic")
    assert check.status == "fail" and check.detail.startswith(f"TCP 127.0.0.1:{port}:") and "refused" in check.detail


def test_offline_skips_every_configured_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "1" * 32)
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_secret")
    checks = {c.name: c for c in check_network(load_settings(), is_online=lambda: False)}
    assert checks["network-twilio"].status == "skip" and checks["network-stripe"].status == "skip"
    assert checks["network-twilio"].detail == "skipped: offline (no route to reach api.twilio.com)"


def unshare_command() -> list[str]:
    """A command prefix that runs in a new, empty network namespace, or skip if this box cannot."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    prefix = [unshare, "--net"] if os.geteuid() == 0 else [unshare, "--net", "--map-root-user"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    return prefix


def test_the_cli_on_a_box_without_network_says_skipped_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = unshare_command()
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "1" * 32)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "the-secret-auth-token")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    out = subprocess.run(
        [*prefix, sys.executable, "-m", "xswarm_tui.cli", "doctor", "--network", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ.copy(),
    )
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["network-twilio"]["status"] == "skip" and "skipped: offline" in checks["network-twilio"]["detail"]
    assert checks["network-openai"]["status"] == "skip" and "skipped: offline" in checks["network-openai"]["detail"]
    assert checks["network-stripe"]["detail"] == "skipped: not configured"
    assert "the-secret-auth-token" not in out.stdout + out.stderr
