"""The aiohttp application: routes, the guard every request passes (refusal limits, signature
headers present) and the processor's effect table."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from engine.notify import links
from webhooks import identity, metrics, notify_links, sendgrid_mail, stripe_billing, twilio_sms, twilio_voice
from webhooks.body import BODY_TIMEOUT_S
from webhooks.hub import HUB, Effect, Hub
from webhooks.limits import LogThrottle, client_address, refusal_cost
from webhooks.verify import (
    SENDGRID_SIGNATURE,
    SENDGRID_TIMESTAMP,
    SendGridVerifier,
    StripeVerifier,
    TwilioVerifier,
    forbidden,
    not_configured,
)

log = logging.getLogger("xswarm.webhooks")
_quiet_429 = LogThrottle()

EFFECTS: dict[str, Effect] = {
    twilio_sms.PROVIDER: twilio_sms.effect,
    twilio_voice.PROVIDER: twilio_voice.effect,
    stripe_billing.PROVIDER: stripe_billing.effect,
    sendgrid_mail.PARSE: sendgrid_mail.inbound_effect,
    sendgrid_mail.EVENTS: sendgrid_mail.events_effect,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _group(path: str) -> str | None:
    """The rate-limit group of a path (None: not limited)."""
    if path in ("/health", "/metrics"):
        return None
    return path.split("/", 2)[1] or None


SIGNATURE_HEADERS = {
    "twilio": ("X-Twilio-Signature",),
    "sendgrid": (SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP),
    "stripe": ("Stripe-Signature",),
}
"""Per route group, the headers a provider always sends: without them a request is refused
before its body is read (the full check, over the body, comes in the route)."""


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals are counted per source and a source out of refusals gets 429 at once; see
    ``webhooks.limits``. Every refusal is answered with a fresh response, never by letting the
    exception travel on: its traceback holds the handler's frames and with them the request
    body, and in a reference cycle that the collector (tuned down in a server process, see
    ``tune_server_process``) reaches late, so 30 refused 29 MB bodies grew a worker to ~1 GB."""
    hub: Hub = request.app[HUB]
    group = _group(request.path)
    limiter = hub.limiter if group is not None else None
    source = client_address(request, hub.trusted_proxies)
    if limiter is not None and limiter.exhausted(group, source):  # type: ignore[arg-type]
        held = _quiet_429.allow()
        if held is not None:
            log.warning("rate limit: %s from %s (%d more 429s not logged)", group, source, held)
        return web.Response(
            status=429, text="too many refused requests", headers={"Retry-After": str(limiter.retry_after())}
        )
    try:
        verifiers: dict[str, TwilioVerifier | SendGridVerifier | StripeVerifier] = {
            "twilio": hub.twilio,
            "sendgrid": hub.sendgrid,
            "stripe": hub.stripe,
        }
        verifier = verifiers.get(group or "")
        if verifier is not None and not verifier.configured:  # say so before reading any body
            raise _unconfigured(group or "")
        missing = [name for name in SIGNATURE_HEADERS.get(group or "", ()) if name not in request.headers]
        if missing:
            raise forbidden(group or "", f"no {missing[0]} header")
        return await handler(request)
    except web.HTTPException as exc:
        if limiter is not None and 400 <= exc.status < 500:
            limiter.charge(group, source, refusal_cost(request))  # type: ignore[arg-type]
        return _answer(exc)


def _unconfigured(group: str) -> web.HTTPServiceUnavailable:
    what = {"twilio": "TWILIO_AUTH_TOKEN", "sendgrid": "SENDGRID_WEBHOOK_PUBLIC_KEY", "stripe": "STRIPE_WEBHOOK_SECRET"}
    return not_configured(what[group])


def _answer(exc: web.HTTPException) -> web.Response:
    """The response an ``HTTPException`` stands for, without the exception (and so without its
    traceback's frames)."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    return web.Response(
        status=exc.status, reason=exc.reason, text=exc.text, headers=headers, content_type=exc.content_type
    )


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition (docs/monitoring.md); the proxy configs keep it off the public side."""
    hub: Hub = request.app[HUB]
    body, content_type = await hub.metrics.render(hub)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def create_app(hub: Hub) -> web.Application:
    app = web.Application(middlewares=[metrics.middleware(hub.metrics), _guard], client_max_size=1024 * 1024)
    app[HUB] = hub
    app[BODY_TIMEOUT_S] = hub.settings.server.request_timeout_s
    app.router.add_post("/twilio/sms", twilio_sms.route)
    app.router.add_post("/twilio/voice", twilio_voice.voice)
    app.router.add_post("/twilio/voice/status", twilio_voice.status)
    app.router.add_post(twilio_voice.VOICEMAIL_PATH, twilio_voice.voicemail)
    app.router.add_post(twilio_voice.TRANSCRIPTION_PATH, twilio_voice.transcription)
    app.router.add_post(twilio_voice.REROUTE_PATH, twilio_voice.reroute)
    app.router.add_post("/sendgrid/inbound", sendgrid_mail.inbound)
    app.router.add_post("/sendgrid/events", sendgrid_mail.events)
    app.router.add_post("/stripe/webhook", stripe_billing.route)
    app.router.add_get(links.UNSUBSCRIBE_PATH, notify_links.unsubscribe)
    app.router.add_post(links.UNSUBSCRIBE_PATH, notify_links.unsubscribe)
    app.router.add_get(links.VOICEMAIL_PATH + "/{sid}", notify_links.voicemail)
    app.router.add_get("/api/identity", identity.identity)
    app.router.add_get("/health", identity.health)
    app.router.add_get("/metrics", _metrics)
    return app
