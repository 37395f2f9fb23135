"""Local stand-ins for the providers' HTTP APIs (Twilio, SendGrid, Stripe), on 127.0.0.1.

They speak the real wire formats our SDK clients use (Twilio's JSON and list pages, Stripe's
form-encoded requests, idempotency keys and objects, SendGrid's mail send), keep what was
sent, and can act like the provider afterwards: Stripe completing a checkout and delivering
its signed events, SendGrid delivering its signed ``processed`` events. ``kill_pid``: the
process to SIGKILL once a message has been accepted and before it is answered (the window
between the provider taking a message and our commit).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import aiohttp
import stripe
from aiohttp import web

from tests.local_http import start_local_app
from tests.webhooks_support import STRIPE_SECRET, SendGridKey


@dataclass
class _Server:
    url: str = ""
    runner: web.AppRunner | None = None
    kill_pid: int | None = None
    """SIGKILL this process after accepting the next message: before answering, or, with
    ``kill_after_answer``, right after the whole 2xx answer was written."""
    kill_after_answer: bool = False

    async def serve(self, routes: list[web.RouteDef]) -> None:
        self.runner, port = await start_local_app(*routes)
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _answer(self, request: web.Request, response: web.Response) -> web.Response:
        """Answer an accepted message, killing ``kill_pid`` before or after the answer."""
        if self.kill_pid is None:
            return response
        pid, self.kill_pid = self.kill_pid, None
        if self.kill_after_answer:
            await response.prepare(request)
            await response.write_eof()
        os.kill(pid, signal.SIGKILL)
        return response


@dataclass
class FakeTwilio(_Server):
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Every message created, oldest first (Twilio's JSON shape)."""
    list_queries: int = 0
    refuse: dict[str, tuple[int, int]] = field(default_factory=dict)
    """To-number -> (HTTP status, Twilio code) to answer instead of sending."""
    unreachable: bool = False
    """Drop the connection without an answer (after accepting nothing)."""

    async def start(self) -> FakeTwilio:
        base = "/2010-04-01/Accounts/{account}"
        await self.serve(
            [
                web.post(base + "/Messages.json", self._create),
                web.get(base + "/Messages.json", self._list),
                web.get(base + "/Recordings/{sid}.mp3", self._recording),
            ]
        )
        return self

    async def _create(self, request: web.Request) -> web.StreamResponse:
        form = dict(await request.post())
        if self.unreachable:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        if form.get("To") in self.refuse:
            status, code = self.refuse[str(form["To"])]
            return web.json_response(
                {"code": code, "message": f"refused {form['To']}", "status": status}, status=status
            )
        message = {
            "sid": f"SM{len(self.messages) + 1:032x}",
            "account_sid": request.match_info["account"],
            "to": form.get("To"),
            "from": form.get("From"),
            "body": form.get("Body"),
            "status": "queued",
            "date_created": format_datetime(datetime.now(UTC), usegmt=True),
            "date_sent": None,
            "auth": request.headers.get("Authorization"),
        }
        self.messages.append(message)
        return await self._answer(request, web.json_response(message, status=201))

    async def _list(self, request: web.Request) -> web.Response:
        self.list_queries += 1
        found = [
            m
            for m in reversed(self.messages)
            if m["to"] == request.query.get("To", m["to"]) and m["from"] == request.query.get("From", m["from"])
        ]
        size = int(request.query.get("PageSize", "50"))
        return web.json_response(
            {"messages": found[:size], "next_page_uri": None, "page": 0, "page_size": size, "start": 0, "end": 0}
        )

    async def _recording(self, request: web.Request) -> web.Response:
        return web.Response(body=b"ID3 fake mp3 of " + request.match_info["sid"].encode(), content_type="audio/mpeg")

    def to(self, number: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["to"] == number]


@dataclass
class FakeSendGrid(_Server):
    mails: list[dict[str, Any]] = field(default_factory=list)
    """Every mail accepted: its JSON body plus ``_headers`` and ``_id`` (X-Message-Id)."""

    async def start(self) -> FakeSendGrid:
        await self.serve([web.post("/v3/mail/send", self._send)])
        return self

    async def _send(self, request: web.Request) -> web.Response:
        body = await request.json()
        body["_headers"] = dict(request.headers)
        body["_id"] = f"sgmsg{len(self.mails) + 1}"
        self.mails.append(body)
        return await self._answer(request, web.Response(status=202, headers={"X-Message-Id": body["_id"]}))

    def to(self, address: str) -> list[dict[str, Any]]:
        return [m for m in self.mails if m["personalizations"][0]["to"][0]["email"] == address]

    async def deliver_events(self, webhook_url: str, key: SendGridKey, kind: str = "processed") -> int:
        """Post one signed event per accepted mail, custom args at the top level (as SendGrid does)."""
        items = [
            {
                "email": m["personalizations"][0]["to"][0]["email"],
                "timestamp": int(time.time()),
                "event": kind,
                "sg_event_id": f"ev-{kind}-{m['_id']}",
                "sg_message_id": f"{m['_id']}.filterdrecv-1",
                **m.get("custom_args", {}),
            }
            for m in self.mails
        ]
        body = json.dumps(items).encode()
        headers = {"Content-Type": "application/json", **key.headers(body)}
        async with aiohttp.ClientSession() as session, session.post(webhook_url, data=body, headers=headers) as resp:
            return resp.status


@dataclass
class FakeStripe(_Server):
    requests: list[dict[str, Any]] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    _replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    async def start(self) -> FakeStripe:
        await self.serve(
            [
                web.post("/v1/customers", self._customer),
                web.post("/v1/checkout/sessions", self._checkout),
                web.post("/v1/billing_portal/sessions", self._portal),
            ]
        )
        return self

    async def _record(self, request: web.Request) -> tuple[dict[str, str], str | None]:
        form = {k: str(v) for k, v in (await request.post()).items()}
        key = request.headers.get("Idempotency-Key")
        self.requests.append(
            {"path": request.path, "form": form, "key": key, "auth": request.headers.get("Authorization")}
        )
        return form, key

    def _idempotent(self, key: str | None, make: Any) -> web.Response:
        """Stripe answers a repeated idempotency key with the first answer."""
        if key is not None and key in self._replies:
            return web.json_response(self._replies[key])
        reply = make()
        if key is not None:
            self._replies[key] = reply
        return web.json_response(reply)

    async def _customer(self, request: web.Request) -> web.Response:
        form, key = await self._record(request)

        def make() -> dict[str, Any]:
            customer = {
                "id": f"cus_{next(self._ids)}",
                "object": "customer",
                "email": form.get("email"),
                "metadata": {"user_id": form.get("metadata[user_id]")},
            }
            self.customers[customer["id"]] = customer
            return customer

        return self._idempotent(key, make)

    async def _checkout(self, request: web.Request) -> web.Response:
        form, key = await self._record(request)

        def make() -> dict[str, Any]:
            sid = f"cs_test_{next(self._ids)}"
            session = {
                "id": sid,
                "object": "checkout.session",
                "mode": form.get("mode"),
                "status": "open",
                "customer": form.get("customer"),
                "client_reference_id": form.get("client_reference_id"),
                "metadata": {"user_id": form.get("metadata[user_id]"), "tier": form.get("metadata[tier]")},
                "price": form.get("line_items[0][price]"),
                "url": f"https://checkout.stripe.test/c/pay/{sid}#fidkdWxOYHwnPyd1blpxYHZxWjA0T" + "x" * 120,
            }
            self.sessions[sid] = session
            return session

        return self._idempotent(key, make)

    async def _portal(self, request: web.Request) -> web.Response:
        form, _ = await self._record(request)
        n = next(self._ids)
        return web.json_response(
            {
                "id": f"bps_{n}",
                "object": "billing_portal.session",
                "customer": form.get("customer"),
                "url": f"https://billing.stripe.test/p/session/bps_{n}",
            }
        )

    def session_for(self, url: str) -> dict[str, Any]:
        return next(s for s in self.sessions.values() if s["url"] == url)

    async def complete(self, session_id: str, webhook_url: str) -> list[int]:
        """The customer pays: deliver ``checkout.session.completed`` and
        ``customer.subscription.created``, signed, in that order; returns the HTTP answers."""
        session = self.sessions[session_id]
        sub_id = f"sub_{next(self._ids)}"
        now = int(time.time())
        completed = dict(
            session, status="complete", payment_status="paid", subscription=sub_id, amount_total=999, currency="usd"
        )
        subscription = {
            "id": sub_id,
            "object": "subscription",
            "customer": session["customer"],
            "status": "active",
            "metadata": session["metadata"],
            "cancel_at_period_end": False,
            "items": {"data": [{"price": {"id": session["price"]}, "current_period_end": now + 30 * 86400}]},
        }
        answers = []
        for n, (kind, obj) in enumerate(
            [("checkout.session.completed", completed), ("customer.subscription.created", subscription)]
        ):
            event = {
                "id": f"evt_{session_id}_{n}",
                "object": "event",
                "type": kind,
                "created": now,
                "data": {"object": obj},
                "livemode": False,
            }
            body = json.dumps(event)
            header = stripe.WebhookSignature.generate_signature_header(body, STRIPE_SECRET, timestamp=now)
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    webhook_url, data=body, headers={"Stripe-Signature": header, "Content-Type": "application/json"}
                ) as resp,
            ):
                answers.append(resp.status)
        return answers


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
