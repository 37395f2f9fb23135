"""Shared pieces for the webhooks tests: settings, a migrated database, the server on
127.0.0.1, local fakes of the providers' HTTP APIs, and signing helpers that use the
providers' own SDK code."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import stripe
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twilio.request_validator import RequestValidator

from engine.config import Settings
from engine.events import EventBus
from engine.store import inbox
from engine.store.db import Database

TWILIO_TOKEN = "twilio-test-auth-token-0123456789"
PUBLIC_URL = "https://hooks.example.com"
STRIPE_SECRET = "whsec_test_secret_abcdef"
CALL_SECRET = "call-token-secret-for-tests"


class Recorder:
    """Collects bus events."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Any] = []
        bus.subscribe(self.events.append)

    def of(self, name: str) -> list[Any]:
        return [e for e in self.events if type(e).__name__ == name]


def make_settings(**sections: dict[str, Any]) -> Settings:
    base: dict[str, dict[str, Any]] = {
        "twilio": {"auth_token": TWILIO_TOKEN, "account_sid": "AC0123", "api_base": "http://127.0.0.1:9"},
        "server": {"public_url": PUBLIC_URL},
        "stripe": {
            "webhook_secret": STRIPE_SECRET,
            "price_tiers": {"price_personal": "personal", "price_pro": "professional"},
        },
        "telephony": {"call_token_secret": CALL_SECRET},
        "llm": {"provider": "none", "sms_budget_s": 1.0, "timeout_s": 3.0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Settings(**base)


# ------------------------------------------------------------------------------ signing


def twilio_post(
    params: dict[str, str], path: str, *, token: str = TWILIO_TOKEN, base: str = PUBLIC_URL
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a Twilio webhook, signed with the SDK's own code."""
    signature = RequestValidator(token).compute_signature(base + path, params)
    return urlencode(params).encode(), {
        "X-Twilio-Signature": signature,
        "Content-Type": "application/x-www-form-urlencoded",
    }


def stripe_post(
    event: dict[str, Any], *, secret: str = STRIPE_SECRET, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp or int(time.time()))
    return body.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}


def stripe_event(event_id: str, kind: str, obj: dict[str, Any], created: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": kind,
        "created": created,
        "data": {"object": obj},
        "livemode": False,
    }


class SendGridKey:
    """An ECDSA P-256 key pair: the public half as SendGrid shows it (base64 DER)."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_b64 = base64.b64encode(der).decode()

    def headers(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        ts = str(timestamp if timestamp is not None else int(time.time()))
        sig = base64.b64encode(self.private.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
        return {"X-Twilio-Email-Event-Webhook-Signature": sig, "X-Twilio-Email-Event-Webhook-Timestamp": ts}


# ---------------------------------------------------------------------------- fake APIs


@dataclass
class FakeApi:
    """A local HTTP server standing in for a provider; records requests, scripted answers."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    behaviour: dict[str, Any] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self, routes: Callable[[FakeApi], list[web.RouteDef]]) -> FakeApi:
        app = web.Application()
        app.add_routes(routes(self))
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def llm_routes(api: FakeApi) -> list[web.RouteDef]:
    async def answer(request: web.Request, shape: str) -> web.Response:
        body = await request.json()
        api.requests.append({"path": request.path, "headers": dict(request.headers), "json": body})
        delay = api.behaviour.get("delay", 0.0)
        if delay:
            await asyncio.sleep(delay)
        if api.behaviour.get("status", 200) != 200:
            return web.json_response({"error": "boom"}, status=api.behaviour["status"])
        text = api.behaviour.get("text", "Sure thing, see you at 5.")
        if shape == "anthropic":
            return web.json_response({"content": [{"type": "text", "text": text}]})
        return web.json_response({"choices": [{"message": {"content": text}}]})

    async def anthropic(request: web.Request) -> web.Response:
        return await answer(request, "anthropic")

    async def openai(request: web.Request) -> web.Response:
        return await answer(request, "openai")

    return [web.post("/v1/messages", anthropic), web.post("/v1/chat/completions", openai)]


def twilio_rest_routes(api: FakeApi) -> list[web.RouteDef]:
    async def send(request: web.Request) -> web.Response:
        form = dict(await request.post())
        api.requests.append({"path": request.path, "auth": request.headers.get("Authorization"), "form": form})
        if api.behaviour.get("status", 201) != 201:
            return web.json_response({"message": "nope"}, status=api.behaviour["status"])
        return web.json_response({"sid": f"SMrest{len(api.requests)}"}, status=201)

    return [web.post("/2010-04-01/Accounts/{sid}/Messages.json", send)]


def sendgrid_routes(api: FakeApi) -> list[web.RouteDef]:
    async def send(request: web.Request) -> web.Response:
        api.requests.append({"headers": dict(request.headers), "json": await request.json()})
        return web.Response(status=202, headers={"X-Message-Id": f"sgmsg{len(api.requests)}"})

    return [web.post("/v3/mail/send", send)]


# ------------------------------------------------------------------------------ helpers


async def wait_processed(
    db: Database, count: int, *, timeout: float = 10.0, status: str = "done"
) -> list[inbox.InboxRow]:
    """Wait until ``count`` inbox rows have ``status``."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await db.aread(lambda d: inbox.list_rows(d, status=status, limit=1000))  # type: ignore[arg-type]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    async with session.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.text()


def serve_cli(port: int, *extra: str) -> subprocess.Popen[str]:
    """`xswarm webhooks serve` on 127.0.0.1:``port`` as its own process, signing with the test token."""
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TWILIO_TOKEN, "XSWARM_PUBLIC_URL": PUBLIC_URL}
    command = [sys.executable, "-c", "from xswarm_tui.commands.webhooks import app; app()", "serve"]
    return subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
