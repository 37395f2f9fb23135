"""The aiohttp application: routes, rate limits and the processor's effect table."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from engine.notify import links
from webhooks import identity, metrics, notify_links, sendgrid_mail, stripe_billing, twilio_sms, twilio_voice
from webhooks.hub import HUB, Effect, Hub

log = logging.getLogger("xswarm.webhooks")

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


@web.middleware
async def _limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    if hub.limiter is not None:
        group = _group(request.path)
        if group is not None and not hub.limiter.allow(group, request.remote or "?"):
            log.warning("rate limit: %s from %s", group, request.remote)
            raise web.HTTPTooManyRequests(
                text="too many requests", headers={"Retry-After": str(hub.limiter.retry_after())}
            )
    return await handler(request)


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition (docs/monitoring.md); the proxy configs keep it off the public side."""
    hub: Hub = request.app[HUB]
    body, content_type = await hub.metrics.render(hub)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def create_app(hub: Hub) -> web.Application:
    app = web.Application(middlewares=[metrics.middleware(hub.metrics), _limits], client_max_size=1024 * 1024)
    app[HUB] = hub
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
