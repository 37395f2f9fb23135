"""Supervisor authentication: two bearer tokens (operator may act, monitor only watches).

Where the tokens come from, first match wins per role: ``settings.supervisor.token`` /
``monitor_token`` (so ``XSWARM_SUPERVISOR_TOKEN`` / ``XSWARM_SUPERVISOR_MONITOR_TOKEN`` or the
TOML file), else ``<config>/supervisor-tokens.json``, which is created at first start with
fresh random tokens and mode 0600. The server never logs a token; ``xswarm supervisor token``
prints one only when asked.

The token file may hold several tokens per role (a list, newest last): every one of them is
accepted and the newest is the one ``xswarm supervisor token`` prints. That is how tokens
rotate without a restart (``engine.supervisor.tokens``: add one, move the consoles, retire the
old one; the server re-reads the file when it changes).

Failed attempts are limited per client address (a sliding window), so a token cannot be
guessed online, and every failure is written to ``audit_log`` by the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.config import MIN_SUPERVISOR_TOKEN, Settings, secret
from engine.paths import Paths, resolve_paths

log = logging.getLogger("xswarm.supervisor")

Role = Literal["operator", "monitor"]
ROLES: tuple[Role, ...] = ("operator", "monitor")
TOKEN_FILE = "supervisor-tokens.json"
_MIN_TOKEN_CHARS = MIN_SUPERVISOR_TOKEN


class AuthConfigError(ValueError):
    """The configured tokens cannot be used (too short, equal, unreadable file)."""


@dataclass(frozen=True)
class Tokens:
    operator: str
    monitor: str
    source: dict[Role, str]
    """Per role: "settings" or the path of the token file, for `xswarm supervisor token`."""
    accepted: dict[Role, tuple[str, ...]] = field(default_factory=dict)
    """Per role, every token that logs in (the newest, above, and older ones not yet retired)."""

    def valid(self, role: Role) -> tuple[str, ...]:
        return self.accepted.get(role) or (getattr(self, role),)


def fingerprint(token: str) -> str:
    """A token's public name: the start of its SHA-256, safe to print, log and type."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def token_file(paths: Paths | None = None) -> Path:
    return (paths or resolve_paths()).config / TOKEN_FILE


def load_tokens(settings: Settings, paths: Paths | None = None) -> Tokens:
    """The two tokens, generating and storing the ones not set in settings."""
    configured: dict[Role, str | None] = {
        "operator": secret(settings.supervisor.token),
        "monitor": secret(settings.supervisor.monitor_token),
    }
    path = token_file(paths)
    stored: dict[str, list[str]] = {}
    if not all(configured.values()):
        stored = {role: token_list(value) for role, value in _read_or_create(path).items() if role in ROLES}
    accepted: dict[Role, tuple[str, ...]] = {}
    source: dict[Role, str] = {}
    for role in ROLES:
        value = configured[role]
        if value:
            if len(value) < _MIN_TOKEN_CHARS:
                raise AuthConfigError(f"supervisor {role} token must be at least {_MIN_TOKEN_CHARS} characters")
            accepted[role], source[role] = (value,), "settings"
        else:
            accepted[role], source[role] = tuple(stored[role]), str(path)
    if set(accepted["operator"]) & set(accepted["monitor"]):
        raise AuthConfigError("the supervisor operator and monitor tokens must differ")
    return Tokens(accepted["operator"][-1], accepted["monitor"][-1], source, accepted)


def token_list(value: object) -> list[str]:
    """One role's entry in the token file: a token, or a list of them (newest last)."""
    return [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []


def _read_or_create(path: Path) -> dict[str, str]:
    """Read the token file, or create it with 0600 perms (O_EXCL: two starts cannot race)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(
            isinstance(data.get(r), str | list)
            and token_list(data[r])
            and all(isinstance(v, str) and len(v) >= _MIN_TOKEN_CHARS for v in token_list(data[r]))
            for r in ROLES
        ):
            raise AuthConfigError(
                f"{path}: expected a token or a list of tokens for {', '.join(ROLES)}; delete it to regenerate"
            )
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others; permissions reset to 0600", path)
        return data
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        if isinstance(exc, AuthConfigError):
            raise
        raise AuthConfigError(f"{path}: cannot read supervisor tokens ({exc}); delete it to regenerate") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {role: secrets.token_urlsafe(32) for role in ROLES}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it between our read and now
        return _read_or_create(path)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    log.info("generated supervisor tokens in %s", path)
    return data


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class Authenticator:
    """Checks tokens in constant time and limits failures per client address."""

    def __init__(self, tokens: Tokens, *, max_failures: int = 5, window_s: float = 60.0) -> None:
        self.replace(tokens)
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}

    def replace(self, tokens: Tokens) -> None:
        """Accept these tokens from now on (a rotation); sessions are the server's to close."""
        self._tokens = {role: [value.encode() for value in tokens.valid(role)] for role in ROLES}
        self.fingerprints = {role: {fingerprint(value) for value in tokens.valid(role)} for role in ROLES}

    def role_of(self, token: str | None) -> Role | None:
        """The role a token grants, or None. Every accepted token is always compared, so the
        time taken says nothing about which one (or how much of one) matched."""
        given = (token or "").encode()
        found: Role | None = None
        for role in ROLES:
            for value in self._tokens[role]:
                if hmac.compare_digest(given, value):
                    found = role
        return found

    def blocked(self, address: str, now: float | None = None) -> bool:
        """True while ``address`` has used up its failures in the current window."""
        times = self._failures.get(address)
        if not times:
            return False
        now = time.monotonic() if now is None else now
        while times and now - times[0] > self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            return False
        return len(times) >= self.max_failures

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._failures.setdefault(address, deque()).append(now)
        if len(self._failures) > 10_000:  # a scan from many addresses must not grow memory forever
            oldest = min(self._failures, key=lambda a: self._failures[a][-1])
            del self._failures[oldest]

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
