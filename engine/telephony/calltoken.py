"""One-time call tokens: minted by the voice webhook, checked and burnt by the bridge.

Format ``ct1.<expires_unix>.<nonce>.<sig>`` where ``sig`` = HMAC-SHA256(secret,
"<call_sid>|<expires>|<nonce>") in URL-safe base64. The token is bound to the CallSid (the
bridge compares it with ``start.callSid``) and expires within ``ttl`` seconds. "Once" is
enforced by the bridge's ``TokenLedger`` (a token's nonce can be burnt once per process; the
TTL bounds how long the ledger must remember it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time

PREFIX = "ct1"


class TokenError(ValueError):
    """Why a token was refused, in words fit for a close reason and a log line."""


def _sign(secret: bytes, call_sid: str, expires: int, nonce: str) -> str:
    mac = hmac.new(secret, f"{call_sid}|{expires}|{nonce}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def mint(secret: str, call_sid: str, ttl_s: int = 60, now: float | None = None) -> str:
    """A token for ``call_sid`` valid for ``ttl_s`` seconds."""
    if not secret:
        raise TokenError("no call token secret configured")
    expires = int((now if now is not None else time.time()) + ttl_s)
    nonce = secrets.token_urlsafe(12)
    return f"{PREFIX}.{expires}.{nonce}.{_sign(secret.encode(), call_sid, expires, nonce)}"


def verify(secret: str, token: str, call_sid: str, now: float | None = None) -> str:
    """Check signature, binding and expiry; returns the nonce (for burning) or raises."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 4 or parts[0] != PREFIX:
        raise TokenError("malformed call token")
    _, expires_s, nonce, sig = parts
    if not expires_s.isdigit():
        raise TokenError("malformed call token")
    expected = _sign(secret.encode(), call_sid, int(expires_s), nonce)
    if not hmac.compare_digest(expected, sig):
        raise TokenError("call token does not match this call")
    if int(expires_s) < (now if now is not None else time.time()):
        raise TokenError("call token expired")
    return nonce


class TokenLedger:
    """Remembers burnt nonces until they would have expired anyway."""

    def __init__(self) -> None:
        self._burnt: dict[str, float] = {}
        self._lock = threading.Lock()

    def burn(self, secret: str, token: str, call_sid: str, now: float | None = None) -> None:
        """Verify and burn in one step; a second use raises ``TokenError``."""
        moment = now if now is not None else time.time()
        nonce = verify(secret, token, call_sid, moment)
        expires = float(token.split(".")[1])
        with self._lock:
            for old in [n for n, exp in self._burnt.items() if exp < moment]:
                del self._burnt[old]
            if nonce in self._burnt:
                raise TokenError("call token already used")
            self._burnt[nonce] = expires
