"""``GET /api/identity`` (who owns this API key, with quotas and usage left) and ``GET /health``.

Every failed key check answers the same 401 body and header, whether the key was missing,
malformed, unknown or revoked, so a caller learns nothing about which.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from engine.store import inbox, usage
from engine.store.db import Database, StoreError
from engine.store.users import User, user_for_api_key
from engine.tiers import tier as tier_named
from webhooks.hub import HUB, Hub

log = logging.getLogger("xswarm.webhooks.identity")
HEALTH_TIMEOUT_S = 2.0


def _unauthorized() -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text='{"error":"unauthorized"}', content_type="application/json", headers={"WWW-Authenticate": "Bearer"}
    )


def _left(limit: int | None, used: float) -> float | None:
    return None if limit is None else max(0.0, round(limit - used, 1))


def _identity(db: Database, key: str) -> dict[str, Any] | None:
    user: User | None = user_for_api_key(db, key)
    if user is None:
        return None
    try:
        plan = tier_named(user.tier)
    except ValueError:
        plan = tier_named("free")
    used = usage.usage_for(db, user.id)
    return {
        "id": user.id,
        "name": user.name,
        "email": user.email,
        "phone": user.phone,
        "tier": plan.name,
        "theme": user.theme,
        "quotas": {"voice_minutes": plan.voice_minutes, "sms": plan.sms, "email": plan.email},
        "usage": {
            "period": used.period,
            "voice_minutes": round(used.voice_minutes, 1),
            "sms": used.sms_count,
            "email": used.email_count,
        },
        "remaining": {
            "voice_minutes": _left(plan.voice_minutes, used.voice_minutes),
            "sms": _left(plan.sms, used.sms_count),
            "email": _left(plan.email, used.email_count),
        },
    }


async def identity(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized()
    try:
        body = await hub.read(lambda d: _identity(d, key.strip()))
    except StoreError as exc:
        log.error("identity lookup failed: %s", exc)
        raise web.HTTPServiceUnavailable(text="storage unavailable") from None
    if body is None:
        raise _unauthorized()
    return web.json_response(body, headers={"Cache-Control": "private, no-store"})


async def health(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    try:
        ping = await asyncio.wait_for(hub.db.aread(lambda d: d.ping()), HEALTH_TIMEOUT_S)
        counts = await asyncio.wait_for(hub.db.aread(inbox.counts), HEALTH_TIMEOUT_S)
    except (StoreError, TimeoutError) as exc:
        return web.json_response({"status": "unavailable", "database": f"error: {exc}"[:200]}, status=503)
    if hub.db.write_error is not None:  # reads work, writes do not: every delivery gets 503
        failing = {"status": "unavailable", "database": f"writes failing: {hub.db.write_error}"[:200]}
        return web.json_response(failing, status=503)
    body: dict[str, object] = {
        "status": "ok",
        "database": "ok",
        "database_ms": round(ping * 1000, 2),
        "inbox": {s: counts.get(s, 0) for s in ("pending", "failed", "dead", "done")},
    }
    if hub.worker is not None:
        body["worker"] = hub.worker
    return web.json_response(body)
