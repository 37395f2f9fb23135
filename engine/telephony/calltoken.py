"""One-time call tokens: minted by the voice webhook, checked and burnt by the bridge.

Format ``ct2.<expires_unix>.<nonce>.<claims>.<sig>``: ``claims`` is the URL-safe base64 of a
JSON object with the call's ``user_id``, ``caller`` and ``theme``, and ``sig`` =
HMAC-SHA256(secret, "<call_sid>|<expires>|<nonce>|<claims>") in URL-safe base64.

Why the claims are in the token: the bridge takes who is calling (user, number, theme) from
what the voice webhook decided, never from the ``start`` message's ``customParameters``, which
whoever holds a token could fill in (a spoofed ``calls`` row was written that way). The token
is bound to the CallSid (the bridge compares it with ``start.callSid``) and expires within
``ttl`` seconds. "Once" is enforced by the ``TokenLedger`` in memory and by the
``used_call_tokens`` table (``engine.store.calltokens``), which outlives a restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass

PREFIX = "ct2"
MAX_TOKEN_CHARS = 2048
"""Longer strings are refused before any decoding (a token is ~200 characters)."""


class TokenError(ValueError):
    """Why a token was refused, in words fit for a close reason and a log line."""


@dataclass(frozen=True)
class Claims:
    """Who the voice webhook admitted: the bridge's only source for these three."""

    user_id: str | None = None
    caller: str | None = None
    theme: str | None = None


@dataclass(frozen=True)
class Verified:
    nonce: str
    expires: int
    claims: Claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(secret: bytes, call_sid: str, expires: int, nonce: str, claims: str) -> str:
    mac = hmac.new(secret, f"{call_sid}|{expires}|{nonce}|{claims}".encode(), hashlib.sha256).digest()
    return _b64(mac)


def mint(secret: str, call_sid: str, ttl_s: int = 60, now: float | None = None, claims: Claims | None = None) -> str:
    """A token for ``call_sid`` valid for ``ttl_s`` seconds, carrying ``claims``."""
    if not secret:
        raise TokenError("no call token secret configured")
    expires = int((now if now is not None else time.time()) + ttl_s)
    nonce = secrets.token_urlsafe(12)
    fields = claims or Claims()
    body = _b64(json.dumps([fields.user_id, fields.caller, fields.theme], separators=(",", ":")).encode())
    return f"{PREFIX}.{expires}.{nonce}.{body}.{_sign(secret.encode(), call_sid, expires, nonce, body)}"


def verify(secret: str, token: str, call_sid: str, now: float | None = None) -> Verified:
    """Check signature, binding and expiry; returns the nonce (for burning) and the claims."""
    parts = token.split(".") if isinstance(token, str) and len(token) <= MAX_TOKEN_CHARS else []
    if len(parts) != 5 or parts[0] != PREFIX or not parts[1].isdigit():
        raise TokenError("malformed call token")
    _, expires_s, nonce, body, sig = parts
    expected = _sign(secret.encode(), call_sid, int(expires_s), nonce, body)
    if not hmac.compare_digest(expected, sig):
        raise TokenError("call token does not match this call")
    if int(expires_s) < (now if now is not None else time.time()):
        raise TokenError("call token expired")
    try:
        values = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):
        raise TokenError("malformed call token") from None  # signed by us, so never in practice
    if not (isinstance(values, list) and len(values) == 3 and all(v is None or isinstance(v, str) for v in values)):
        raise TokenError("malformed call token")
    return Verified(nonce, int(expires_s), Claims(*values))


class TokenLedger:
    """Remembers burnt nonces until they would have expired anyway (this process; the
    ``used_call_tokens`` table remembers them across restarts and nodes)."""

    def __init__(self) -> None:
        self._burnt: dict[str, float] = {}
        self._lock = threading.Lock()

    def remember(self, nonce: str, expires: float) -> None:
        """A nonce burnt earlier (loaded from the database at start)."""
        with self._lock:
            self._burnt[nonce] = expires

    def burn(self, secret: str, token: str, call_sid: str, now: float | None = None) -> Verified:
        """Verify and burn in one step; a second use raises ``TokenError``."""
        moment = now if now is not None else time.time()
        verified = verify(secret, token, call_sid, moment)
        with self._lock:
            for old in [n for n, exp in self._burnt.items() if exp < moment]:
                del self._burnt[old]
            if verified.nonce in self._burnt:
                raise TokenError("call token already used")
            self._burnt[verified.nonce] = verified.expires
        return verified
