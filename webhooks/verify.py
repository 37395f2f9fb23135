"""Signature checks for the three providers, always over the untouched request.

Nothing else reads a body before these pass. A failed check is a 403 and stores nothing; a
missing secret is a 503 (the operator must configure it, and the provider keeps retrying
meanwhile instead of dropping the event).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from typing import Any
from urllib.parse import urlparse

import stripe
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from multidict import MultiDict
from sendgrid.helpers.eventwebhook import EventWebhook
from twilio.request_validator import RequestValidator, add_port, remove_port

from webhooks.body import joined, read_chunks
from webhooks.limits import LogThrottle

log = logging.getLogger("xswarm.webhooks")

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
SENDGRID_MAX_AGE_S = 300
STRIPE_TOLERANCE_S = 300
_quiet = LogThrottle()
"""Refused requests are logged at most 5 a second: a flood must not become a log flood."""


def forbidden(provider: str, why: str) -> web.HTTPForbidden:
    held = _quiet.allow()
    if held is not None:
        log.warning("%s: refused unverified request: %s%s", provider, why, f" ({held} more not logged)" if held else "")
    return web.HTTPForbidden(text="signature verification failed")


def not_configured(what: str) -> web.HTTPServiceUnavailable:
    held = _quiet.allow()
    if held is not None:
        log.error("webhook refused: %s is not configured%s", what, f" ({held} more not logged)" if held else "")
    return web.HTTPServiceUnavailable(text=f"{what} is not configured on this server")


class TwilioVerifier:
    """``X-Twilio-Signature`` over the public URL Twilio called plus every posted param.

    The URL is the configured public base URL + the request's path and query byte for byte:
    behind a proxy or tunnel ``request.url`` shows the internal address and never matches."""

    def __init__(self, auth_token: str | None, public_url: str | None) -> None:
        self._validator = RequestValidator(auth_token) if auth_token else None
        self._base = public_url.rstrip("/") if public_url else None

    @property
    def configured(self) -> bool:
        return self._validator is not None

    def url_for(self, request: web.Request) -> str:
        base = self._base or f"{request.scheme}://{request.host}"
        return base + request.raw_path

    def check(self, request: web.Request, params: MultiDict[str]) -> None:
        if self._validator is None:
            raise not_configured("TWILIO_AUTH_TOKEN")
        signature = request.headers.get("X-Twilio-Signature")
        if not signature:
            raise forbidden("twilio", "no X-Twilio-Signature header")
        url = self.url_for(request)
        # The URL exactly as configured first (the common case), then the same URL with the
        # default port added or removed, as the SDK's ``validate`` also tries: each variant
        # HMACed once (``validate`` after a miss redid the first one, and a failed check is
        # what an attacker makes us pay for).
        parsed = urlparse(url)
        for candidate in dict.fromkeys((url, add_port(parsed), remove_port(parsed))):
            expected = self._validator.compute_signature(candidate, params)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                return
        raise forbidden("twilio", "signature does not match")


class StripeVerifier:
    """``Stripe-Signature`` over the raw bytes with a 300 s tolerance."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret

    @property
    def configured(self) -> bool:
        return bool(self._secret)

    def check(self, raw: bytes, header: str | None) -> dict[str, Any]:
        """The verified event as a dict."""
        if not self._secret:
            raise not_configured("STRIPE_WEBHOOK_SECRET")
        if not header:
            raise forbidden("stripe", "no Stripe-Signature header")
        try:
            event = stripe.Webhook.construct_event(raw, header, self._secret, tolerance=STRIPE_TOLERANCE_S)
        except stripe.SignatureVerificationError as exc:
            raise forbidden("stripe", str(exc)) from None
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
            # Signature was fine (construct_event verifies first) but the JSON is not an event
            # (RecursionError: nested too deep for the parser).
            raise web.HTTPBadRequest(text="body is not a JSON event") from None
        data = event.to_dict()
        if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str):
            raise web.HTTPBadRequest(text="event has no id or type")
        return data


class SendGridVerifier:
    """ECDSA P-256 over ``timestamp + raw body`` (Event Webhook and signed Inbound Parse),
    plus the timestamp-age check the SDK leaves to us.

    What the headers alone can refuse is refused before the body is read: no key (503), a
    missing or stale timestamp, a signature that is not base64 DER ECDSA (403). The body is
    hashed as it arrives and the ECDSA check runs on that digest, so even a well-formed
    forgery on 29 MiB of mail costs one incremental SHA-256 pass in 64 KiB steps, never a
    whole-body copy and hash that holds the event loop (and every other request) at once."""

    def __init__(self, public_key_b64: str | None) -> None:
        self._key: ec.EllipticCurvePublicKey | None = None
        if public_key_b64:
            try:
                self._key = EventWebhook().convert_public_key_to_ecdsa(public_key_b64)
            except Exception as exc:  # the SDK raises ValueError, binascii.Error or cryptography's own
                log.error("SENDGRID_WEBHOOK_PUBLIC_KEY is not a base64 DER public key: %s", exc)

    @property
    def configured(self) -> bool:
        return self._key is not None

    async def read(self, request: web.Request, limit: int, now: float | None = None) -> bytes:
        """The request's body, once its signature checks out."""
        if self._key is None:
            raise not_configured("SENDGRID_WEBHOOK_PUBLIC_KEY")
        signature, timestamp = _sendgrid_headers(request, now or time.time())
        digest = hashlib.sha256(timestamp.encode())
        chunks = await read_chunks(request, limit, digest.update)
        try:
            self._key.verify(signature, digest.digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            raise forbidden("sendgrid", "signature does not match") from None
        return joined(chunks)


def _sendgrid_headers(request: web.Request, now: float) -> tuple[bytes, str]:
    """The DER signature and the timestamp, or 403 when either cannot be right."""
    signature = request.headers.get(SENDGRID_SIGNATURE)
    timestamp = request.headers.get(SENDGRID_TIMESTAMP)
    if not signature or not timestamp:
        raise forbidden("sendgrid", "signature or timestamp header missing")
    if not timestamp.isascii() or not timestamp.isdigit() or abs(now - int(timestamp)) > SENDGRID_MAX_AGE_S:
        raise forbidden("sendgrid", "timestamp missing or older than 5 minutes")
    try:
        der = base64.b64decode(signature, validate=True)
        decode_dss_signature(der)
    except (ValueError, binascii.Error):
        raise forbidden("sendgrid", "signature is not a base64 DER ECDSA signature") from None
    return der, timestamp
