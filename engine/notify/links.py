"""Signed links in our messages: one-click unsubscribe and "listen to the voicemail".

A link carries its own proof (HMAC-SHA256 keyed by ``notify.link_secret``), so the public
webhooks server can act on it without a session or a login, and a link cannot be altered to
unsubscribe someone else or fetch another caller's recording. Listen links expire.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote, urlencode

from engine.config import Settings, secret

UNSUBSCRIBE_PATH = "/notify/unsubscribe"
VOICEMAIL_PATH = "/notify/voicemail"
LISTEN_TTL_S = 30 * 86400
"""How long a listen link works (Twilio keeps recordings until they are deleted)."""


def _sign(key: str, *parts: str) -> str:
    return hmac.new(key.encode(), "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()


def _base(settings: Settings) -> tuple[str, str] | None:
    key = secret(settings.notify.link_secret)
    base = settings.server.public_url
    return (base.rstrip("/"), key) if key and base else None


def unsubscribe_url(settings: Settings, user_id: str, kind: str) -> str | None:
    """The one-click unsubscribe URL (RFC 8058), or None without a key or public URL."""
    found = _base(settings)
    if found is None:
        return None
    base, key = found
    query = urlencode({"u": user_id, "k": kind, "s": _sign(key, "unsubscribe", user_id, kind)})
    return f"{base}{UNSUBSCRIBE_PATH}?{query}"


def check_unsubscribe(settings: Settings, user_id: str, kind: str, signature: str) -> bool:
    key = secret(settings.notify.link_secret)
    return bool(key) and hmac.compare_digest(
        _sign(key or "", "unsubscribe", user_id, kind).encode(), signature.encode()
    )


def listen_url(settings: Settings, recording_sid: str, *, now: float | None = None) -> str | None:
    """A listen link to one recording that works for ``LISTEN_TTL_S``, or None."""
    found = _base(settings)
    if found is None:
        return None
    base, key = found
    expires = str(int((now if now is not None else time.time()) + LISTEN_TTL_S))
    signature = _sign(key, "listen", recording_sid, expires)
    return f"{base}{VOICEMAIL_PATH}/{quote(recording_sid)}?{urlencode({'e': expires, 's': signature})}"


def check_listen(settings: Settings, recording_sid: str, expires: str, signature: str) -> bool:
    key = secret(settings.notify.link_secret)
    if not key or not (expires.isascii() and expires.isdigit()) or int(expires) < time.time():
        return False
    return hmac.compare_digest(_sign(key, "listen", recording_sid, expires).encode(), signature.encode())
