"""``xswarm doctor --network``: can this box reach each provider it is configured for?

For every configured provider (Twilio, SendGrid, Stripe, the LLM providers, Turso, the S3
endpoint): resolve its host, open TCP to it and complete a TLS handshake that verifies the
certificate against the system's trust store (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` add a
corporate CA), each step under a short timeout, then close. Nothing is sent after the
handshake, so no credential, header or request ever leaves the box: the check proves the path
(DNS, firewall, proxy interception, clock skew that breaks certificates), not the keys
(``xswarm doctor`` without ``--network`` says which keys are set).

A box with no route off itself gets one clear "skipped: offline" per provider instead of a
row of DNS failures; a provider that is not configured is "skipped: not configured".
"""

from __future__ import annotations

import errno
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.config import Settings
from engine.doctor.checks import Check

TIMEOUT_S = 3.0
"""Per step (DNS, connect, handshake): a provider slower than this is a problem in itself."""
_ROUTE_PROBES = (("8.8.8.8", socket.AF_INET), ("2001:4860:4860::8888", socket.AF_INET6))
"""Public addresses whose route is looked up (a UDP connect sends nothing)."""
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Target:
    name: str
    """Check name suffix: ``network-<name>``."""
    url: str | None
    """What this box would call, or None when the provider is not configured."""


def targets(settings: Settings) -> list[Target]:
    """Every provider, with the URL xswarm would use, or None where it is not configured."""
    s = settings
    s3 = None
    if s.s3.bucket:
        s3 = s.s3.endpoint_url or (
            "https://s3.amazonaws.com" if s.s3.region == "auto" else f"https://s3.{s.s3.region}.amazonaws.com"
        )
    database = s.database.url
    if database and database.startswith(("libsql://", "wss://")):
        database = "https://" + database.split("://", 1)[1]
    return [
        Target("twilio", s.twilio.api_base if s.twilio.account_sid or s.twilio.auth_token else None),
        Target("sendgrid", s.sendgrid.api_base if s.sendgrid.api_key else None),
        Target("stripe", s.stripe.api_base if s.stripe.api_key else None),
        Target("anthropic", s.llm.anthropic_base_url if s.llm.anthropic_api_key else None),
        Target("openai", s.llm.openai_base_url if s.llm.openai_api_key else None),
        Target("turso", database),
        Target("s3", s3),
    ]


def online() -> bool:
    """Whether this box has a route off itself (IPv4 or IPv6). A UDP ``connect`` only looks the
    route up: no packet is sent."""
    for address, family in _ROUTE_PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((address, 53))
                return True
        except OSError:
            continue
    return False


class Unreachable(Exception):
    """One step failed; the message names the step and the reason."""


def reach(url: str, *, timeout: float = TIMEOUT_S) -> str:
    """Resolve, connect and (for https/wss) complete a verified TLS handshake; returns what
    was found. Raises ``Unreachable``. Sends no application data."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise Unreachable(f"not a URL: {url}")
    tls = parts.scheme in ("https", "wss")
    port = parts.port or (443 if tls else 80)
    started = time.perf_counter()
    addresses = _resolve(host, port, timeout)
    family, kind, proto, _, address = addresses[0]
    try:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        sock.connect(address)
    except OSError as exc:
        raise Unreachable(f"TCP {address[0]}:{port}: {_reason(exc)}") from None
    with sock:
        if not tls:
            return f"{host}:{port} answers TCP in {_ms(started)} (no TLS: {parts.scheme}://)"
        context = ssl.create_default_context()
        try:
            with context.wrap_socket(sock, server_hostname=host) as wrapped:
                version = wrapped.version()
        except ssl.SSLCertVerificationError as exc:
            raise Unreachable(f"TLS {host}:{port}: certificate not trusted ({exc.verify_message})") from None
        except (ssl.SSLError, OSError) as exc:
            raise Unreachable(f"TLS {host}:{port}: {_reason(exc)}") from None
    return f"{host}:{port} {version} handshake in {_ms(started)}"


def _resolve(host: str, port: int, timeout: float) -> list[tuple]:
    """``getaddrinfo`` under a timeout (it has none of its own): in a daemon thread, so a
    resolver that hangs is abandoned, not waited for."""
    answer: queue.SimpleQueue[list[tuple] | OSError] = queue.SimpleQueue()

    def lookup() -> None:
        try:
            answer.put(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            answer.put(exc)

    threading.Thread(target=lookup, name="xswarm-doctor-dns", daemon=True).start()
    try:
        result = answer.get(timeout=timeout)
    except queue.Empty:
        raise Unreachable(f"DNS {host}: no answer within {timeout:.0f} s") from None
    if isinstance(result, OSError):
        raise Unreachable(f"DNS {host}: {_reason(result)}")
    return result


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


def _ms(started: float) -> str:
    return f"{(time.perf_counter() - started) * 1000:.0f} ms"


def check_network(
    settings: Settings,
    *,
    is_online: Callable[[], bool] = online,
    timeout: float = TIMEOUT_S,
) -> list[Check]:
    """One ``network-<provider>`` check per provider: pass, fail, or skip (not configured,
    offline). A provider on this box itself (localhost) is checked even offline."""
    checks = []
    has_route: bool | None = None
    for target in targets(settings):
        name = f"network-{target.name}"
        if target.url is None:
            checks.append(Check(name, "skip", "skipped: not configured"))
            continue
        host = urlsplit(target.url).hostname or ""
        if host not in _LOOPBACK:
            has_route = is_online() if has_route is None else has_route
            if not has_route:
                checks.append(Check(name, "skip", f"skipped: offline (no route to reach {host})"))
                continue
        try:
            checks.append(Check(name, "pass", reach(target.url, timeout=timeout)))
        except Unreachable as exc:
            checks.append(
                Check(
                    name,
                    "fail",
                    str(exc),
                    "check DNS (/etc/resolv.conf), the firewall's outbound 443, an intercepting proxy's CA"
                    " (SSL_CERT_FILE) and the clock; or the URL in the settings",
                )
            )
    return checks
