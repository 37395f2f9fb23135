"""The one Stripe client: Checkout Sessions (subscribe to a tier) and Customer Portal sessions.

Through the stripe SDK's async client on our aiohttp session (``stripe.AIOHTTPClient``), with
``stripe.api_base`` as its API address (tests run a local fake). What Stripe sends back
(``checkout.session.completed``, ``customer.subscription.*``) is turned into the user's tier
by ``webhooks.stripe_billing``; this module only starts things:

- the customer is reused: a user's ``stripe_customer_id`` when set, otherwise one is created
  (with the user id in its metadata) and the caller stores it, so the next link, the portal
  and every event find the same customer;
- a Checkout Session in subscription mode for the price ``stripe.price_tiers`` maps to the
  tier, with the user id as ``client_reference_id`` and in the session's and the
  subscription's metadata (the subscription events then name the user even before the
  checkout event arrives);
- idempotency keys: creating the customer is keyed by user and email (a retry or a second
  run within Stripe's 24 h window gets the same customer); a session by the caller's key
  (an SMS's MessageSid, so a retried UPGRADE returns the same link).
"""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp

from engine.config import Settings, secret
from engine.store.users import User


class BillingError(Exception):
    """Why a billing link cannot be made, in one line for the operator."""


class StripeCheckout:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self._session = session
        self._client: Any = None

    @property
    def configured(self) -> bool:
        return bool(secret(self.settings.stripe.api_key))

    def _stripe(self) -> Any:
        if self._client is None:
            key = secret(self.settings.stripe.api_key)
            if not key:
                raise BillingError("STRIPE_API_KEY is not set")
            import stripe

            self._client = stripe.StripeClient(
                key,
                base_addresses={"api": self.settings.stripe.api_base.rstrip("/")},
                http_client=stripe.AIOHTTPClient(session=self._session, timeout=20),
                max_network_retries=2,
            )
        return self._client

    def price_for(self, tier: str) -> str:
        """The first price ``stripe.price_tiers`` maps to ``tier``."""
        for price, mapped in self.settings.stripe.price_tiers.items():
            if mapped == tier:
                return price
        raise BillingError(f"tier {tier!r} has no price in stripe.price_tiers")

    def _return_url(self) -> str:
        url = self.settings.stripe.return_url or self.settings.server.public_url
        if not url:
            raise BillingError("set stripe.return_url (or server.public_url): Stripe sends the customer back there")
        return url

    async def customer_for(self, user: User) -> tuple[str, bool]:
        """(customer id, created now): the user's own, or a new one the caller must store."""
        if user.stripe_customer_id:
            return user.stripe_customer_id, False
        digest = hashlib.sha256(f"{user.id}\x1f{user.email or ''}".encode()).hexdigest()[:24]
        params: dict[str, Any] = {"name": user.name, "metadata": {"user_id": user.id}}
        if user.email:
            params["email"] = user.email
        customer = await self._call(
            self._stripe().v1.customers.create_async(params, {"idempotency_key": f"xswarm-customer-{digest}"})
        )
        return str(customer.id), True

    async def checkout_url(self, user: User, customer: str, tier: str, *, idempotency_key: str) -> str:
        price = self.price_for(tier)
        back = self._return_url()
        params: dict[str, Any] = {
            "mode": "subscription",
            "customer": customer,
            "line_items": [{"price": price, "quantity": 1}],
            "client_reference_id": user.id,
            "metadata": {"user_id": user.id, "tier": tier},
            "subscription_data": {"metadata": {"user_id": user.id, "tier": tier}},
            "success_url": _with_query(back, "checkout=done"),
            "cancel_url": _with_query(back, "checkout=cancelled"),
        }
        session = await self._call(
            self._stripe().v1.checkout.sessions.create_async(params, {"idempotency_key": idempotency_key})
        )
        if not session.url:
            raise BillingError(f"Stripe returned Checkout Session {session.id} without a URL")
        return str(session.url)

    async def portal_url(self, user: User) -> str:
        if not user.stripe_customer_id:
            raise BillingError(f"user {user.id} has no Stripe customer yet (send a billing link first)")
        params = {"customer": user.stripe_customer_id, "return_url": self._return_url()}
        session = await self._call(self._stripe().v1.billing_portal.sessions.create_async(params))
        return str(session.url)

    async def _call(self, awaitable: Any) -> Any:
        import stripe

        try:
            return await awaitable
        except stripe.StripeError as exc:
            message = exc.user_message or str(exc) or type(exc).__name__
            raise BillingError(f"Stripe: {' '.join(str(message).split())[:300]}") from None


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"
