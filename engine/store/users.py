"""Users and their API keys (the agreed repository API; see the module functions).

Phones are E.164, emails are checked for shape and compared case-insensitively. API keys are
shown once: only their sha256 and a short visible prefix are stored, so a leaked database
does not leak working keys. Reads are blocking (async callers use ``db.aread``); writes go
through the writer so they are group-committed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from dataclasses import dataclass

from engine.phone import validate_phone
from engine.store.db import Database, StoreError
from engine.tiers import tier as _check_tier

_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
KEY_PREFIX = "xsk_"
_VISIBLE = len(KEY_PREFIX) + 8
"""Characters of a key kept in clear (``xsk_`` + 8) so operators can tell keys apart."""
_TOUCH_EVERY_MS = 60_000
"""``last_used_at`` is refreshed at most this often, so key checks stay reads."""

_COLUMNS = "id, name, phone, email, tier, theme, stripe_customer_id, recording_consent, created_at, updated_at"


@dataclass(frozen=True)
class User:
    id: str
    name: str
    phone: str | None
    email: str | None
    tier: str
    theme: str
    stripe_customer_id: str | None
    recording_consent: bool
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class ApiKey:
    id: str
    user_id: str
    prefix: str
    created_at: int
    revoked_at: int | None
    last_used_at: int | None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _user(row: tuple[object, ...]) -> User:
    values = list(row)
    values[7] = bool(values[7])
    return User(*values)  # type: ignore[arg-type]


def validate_email(email: str) -> str:
    email = email.strip()
    if len(email) > 254 or not _EMAIL.match(email):
        raise ValueError(f"email {email!r} is not a valid address")
    return email


def create_user(db: Database, *, name: str, phone: str, email: str, tier: str = "free", theme: str = "xswarm") -> User:
    """Create a user; ``ValueError`` with a clear message for bad or duplicate input."""
    name = name.strip()
    if not name or len(name) > 200:
        raise ValueError("name must be 1 to 200 characters")
    phone = validate_phone(phone)
    email = validate_email(email)
    _check_tier(tier)
    if not theme or len(theme) > 64:
        raise ValueError("theme must be 1 to 64 characters")
    now = _now_ms()
    user = User(uuid.uuid4().hex, name, phone, email, tier, theme, None, False, now, now)
    try:
        db.write(
            f"INSERT INTO users ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (user.id, name, phone, email, tier, theme, None, 0, now, now),
        )
    except StoreError as exc:
        if "UNIQUE" not in str(exc):
            raise
        if find_by_phone(db, phone):
            raise ValueError(f"a user with phone {phone} already exists") from None
        if find_by_email(db, email):
            raise ValueError(f"a user with email {email} already exists") from None
        raise
    return user


def _one(db: Database, where: str, value: object) -> User | None:
    rows = db.query(f"SELECT {_COLUMNS} FROM users WHERE {where} = ? LIMIT 1", (value,))
    return _user(rows[0]) if rows else None


def get_user(db: Database, user_id: str) -> User | None:
    return _one(db, "id", user_id)


def find_by_phone(db: Database, phone: str) -> User | None:
    return _one(db, "phone", phone.strip())


def find_by_email(db: Database, email: str) -> User | None:
    return _one(db, "email", email.strip())  # the column is COLLATE NOCASE


def find_by_stripe_customer(db: Database, customer_id: str) -> User | None:
    return _one(db, "stripe_customer_id", customer_id)


def lookup(db: Database, ref: str) -> User | None:
    """A user by id, phone or email: what an operator types on the command line."""
    return get_user(db, ref) or find_by_phone(db, ref) or find_by_email(db, ref)


def list_users(db: Database) -> list[User]:
    return [_user(r) for r in db.query(f"SELECT {_COLUMNS} FROM users ORDER BY created_at, id")]


def _update(db: Database, user_id: str, column: str, value: object) -> None:
    count = db.write(f"UPDATE users SET {column} = ?, updated_at = ? WHERE id = ?", (value, _now_ms(), user_id))
    if not count:
        raise ValueError(f"no user with id {user_id!r}")


def set_tier(db: Database, user_id: str, tier: str) -> None:
    _check_tier(tier)
    _update(db, user_id, "tier", tier)


def set_theme(db: Database, user_id: str, theme: str) -> None:
    """The persona the user's calls and replies get (a theme name from ``themes.list_themes()``)."""
    from themes import list_themes

    if theme not in list_themes():
        raise ValueError(f"unknown theme {theme!r}; available: {', '.join(list_themes())}")
    _update(db, user_id, "theme", theme)


def set_stripe_customer(db: Database, user_id: str, customer_id: str) -> None:
    try:
        _update(db, user_id, "stripe_customer_id", customer_id)
    except StoreError as exc:
        if "UNIQUE" in str(exc):
            raise ValueError(f"Stripe customer {customer_id} already belongs to another user") from None
        raise


def set_recording_consent(db: Database, user_id: str, consent: bool) -> None:
    _update(db, user_id, "recording_consent", int(consent))


# ---------------------------------------------------------------------------------- API keys


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(db: Database, user_id: str) -> tuple[str, str]:
    """A new key for the user: (key_id, plain key). The plain key is never stored."""
    if get_user(db, user_id) is None:
        raise ValueError(f"no user with id {user_id!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + uuid.uuid4().hex[:16]
    db.write(
        "INSERT INTO api_keys (id, user_id, prefix, hash, created_at) VALUES (?, ?, ?, ?, ?)",
        (key_id, user_id, key[:_VISIBLE], _hash(key), _now_ms()),
    )
    return key_id, key


def list_api_keys(db: Database, user_id: str) -> list[ApiKey]:
    rows = db.query(
        "SELECT id, user_id, prefix, created_at, revoked_at, last_used_at FROM api_keys"
        " WHERE user_id = ? ORDER BY created_at",
        (user_id,),
    )
    return [ApiKey(*r) for r in rows]


def revoke_api_key(db: Database, key_id_or_prefix: str) -> bool:
    """Revoke one live key by id or visible prefix; False when none (or several) match."""
    rows = db.query(
        "SELECT id FROM api_keys WHERE (id = ? OR prefix = ?) AND revoked_at IS NULL",
        (key_id_or_prefix, key_id_or_prefix),
    )
    if len(rows) != 1:
        return False
    count = db.write("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (_now_ms(), rows[0][0]))
    return bool(count)


def user_for_api_key(db: Database, key: str) -> User | None:
    """The owner of a live key, or None. The lookup is by hash, so timing reveals nothing
    about the stored keys; the final comparison is constant-time as well."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = _hash(key)
    rows = db.query(
        "SELECT k.hash, k.id, k.last_used_at, u.id FROM api_keys k JOIN users u ON u.id = k.user_id"
        " WHERE k.hash = ? AND k.revoked_at IS NULL",
        (digest,),
    )
    if not rows or not hmac.compare_digest(str(rows[0][0]), digest):
        return None
    _, key_id, last_used, user_id = rows[0]
    now = _now_ms()
    if last_used is None or now - int(last_used) > _TOUCH_EVERY_MS:
        db.submit("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key_id))  # no need to wait
    return get_user(db, str(user_id))
