"""The signed links our messages carry (``engine.notify.links``), served by the public server.

``/notify/unsubscribe``: ``GET`` shows a one-button page (mail scanners follow GETs, so a GET
never unsubscribes); ``POST`` (the button, or a mail client's RFC 8058 one-click) turns that
kind of notification off for that user. ``/notify/voicemail/{sid}``: the recording's audio,
relayed from Twilio with our credentials while the link has not expired. A link that does
not verify gets 403 and nothing else.
"""

from __future__ import annotations

import html
import logging

from aiohttp import web

from engine.notify import links
from engine.store import optouts
from engine.store.db import StoreError
from engine.store.outbox import KINDS
from engine.telephony.twilio_rest import RECORDING_SID, TwilioError
from webhooks.body import read_body
from webhooks.hub import HUB, Hub

log = logging.getLogger("xswarm.webhooks.links")
_PAGE = (
    "<!doctype html><meta charset=utf-8><title>xswarm</title>"
    "<form method=post><p>Stop xswarm {kind} messages?</p><button>Unsubscribe</button></form>"
)


def _forbidden() -> web.HTTPForbidden:
    return web.HTTPForbidden(text="this link is not valid")


async def unsubscribe(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    user_id, kind, signature = (request.query.get(k, "") for k in ("u", "k", "s"))
    if kind not in KINDS or not links.check_unsubscribe(hub.settings, user_id, kind, signature):
        raise _forbidden()
    if request.method == "GET":
        return web.Response(text=_PAGE.format(kind=html.escape(kind.replace("_", " "))), content_type="text/html")
    await read_body(request, 4096)  # "List-Unsubscribe=One-Click"; its content changes nothing
    try:
        await hub.db.aread(lambda d: optouts.set_kind(d, user_id, kind, False))
    except StoreError as exc:
        log.error("unsubscribe %s from %s not stored: %s", user_id, kind, exc)
        raise web.HTTPServiceUnavailable(text="please try again in a minute") from None
    return web.Response(text=f"You're unsubscribed from xswarm {kind.replace('_', ' ')} messages.")


async def voicemail(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    sid = request.match_info["sid"]
    expires, signature = request.query.get("e", ""), request.query.get("s", "")
    if not RECORDING_SID.fullmatch(sid) or not links.check_listen(hub.settings, sid, expires, signature):
        raise _forbidden()
    assert hub.twilio_rest is not None
    try:
        audio = await hub.twilio_rest.recording(sid, "mp3")
    except TwilioError as exc:
        log.warning("voicemail %s not relayed: %s", sid, exc)
        raise web.HTTPBadGateway(text="the recording could not be fetched") from None
    return web.Response(body=audio, content_type="audio/mpeg")
