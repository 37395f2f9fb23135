"""``xswarm billing link USER --tier TIER [--send sms|email]`` and ``xswarm billing portal USER``.

The link is a Stripe Checkout Session URL, printed on the last line of stdout (what scripts
read); everything else goes to stderr. ``--send`` queues it in the outbox and tries to send it
at once (see ``engine.notify.sender``).
"""

from __future__ import annotations

import asyncio
import uuid
from enum import StrEnum
from typing import TYPE_CHECKING

import typer

from xswarm_tui.commands._common import EXIT_FAILED, database, fail, load

if TYPE_CHECKING:
    from engine.config import Settings
    from engine.store.db import Database
    from engine.store.users import User

app = typer.Typer(help="Stripe Checkout and Customer Portal links for users.", no_args_is_help=True)


class Channel(StrEnum):
    sms = "sms"
    email = "email"


def _user(db: Database, ref: str) -> User:
    from engine.store.users import lookup

    found = lookup(db, ref)
    if found is None:
        fail(f"no user {ref!r} (give an id, an E.164 phone or an email)", EXIT_FAILED)
    return found


@app.command()
def link(
    user: str = typer.Argument(..., help="Id, phone or email."),
    tier: str = typer.Option(..., "--tier", help="A tier with a price in stripe.price_tiers."),
    send: Channel | None = typer.Option(None, "--send", help="Also text (sms) or email the link to the user."),
) -> None:
    """A Stripe Checkout link that subscribes USER to TIER (URL on the last stdout line)."""
    settings = load()
    with database(settings) as db:
        found = _user(db, user)
        if send is not None:
            _check_reachable(settings, found, send.value)
        url = asyncio.run(_checkout(settings, db, found, tier))
        if send is not None:
            _send(settings, db, found, url, f"your link to subscribe to xswarm {tier}", send.value)
    typer.echo(url)


@app.command()
def portal(
    user: str = typer.Argument(..., help="Id, phone or email."),
    send: Channel | None = typer.Option(None, "--send", help="Also text (sms) or email the link to the user."),
) -> None:
    """A Stripe Customer Portal link where USER manages their subscription and card."""
    settings = load()
    with database(settings) as db:
        found = _user(db, user)
        if send is not None:
            _check_reachable(settings, found, send.value)
        url = asyncio.run(_portal(settings, found))
        if send is not None:
            _send(settings, db, found, url, "your link to manage your xswarm subscription", send.value)
    typer.echo(url)


async def _checkout(settings: Settings, db: Database, user: User, tier: str) -> str:
    import aiohttp

    from engine.checkout import BillingError, StripeCheckout
    from engine.store.users import set_stripe_customer

    async with aiohttp.ClientSession() as session:
        stripe = StripeCheckout(settings, session)
        try:
            stripe.price_for(tier)  # before anything is created at Stripe
            customer, created = await stripe.customer_for(user)
            if created:
                await asyncio.to_thread(set_stripe_customer, db, user.id, customer)
            return await stripe.checkout_url(user, customer, tier, idempotency_key=f"xswarm-checkout-{uuid.uuid4()}")
        except BillingError as exc:
            fail(str(exc), EXIT_FAILED)


async def _portal(settings: Settings, user: User) -> str:
    import aiohttp

    from engine.checkout import BillingError, StripeCheckout

    async with aiohttp.ClientSession() as session:
        try:
            return await StripeCheckout(settings, session).portal_url(user)
        except BillingError as exc:
            fail(str(exc), EXIT_FAILED)


def _check_reachable(settings: Settings, user: User, channel: str) -> None:
    """Before anything is created at Stripe: can the link be sent the way asked?"""
    from engine.notify.compose import Recipient, reachable

    if not reachable(settings, Recipient.of(user), channel):
        need = "a phone and Twilio (credentials, twilio.from_number)" if channel == "sms" else "an email and SendGrid"
        fail(f"cannot {channel} the link: that needs {need}", EXIT_FAILED)


def _send(settings: Settings, db: Database, user: User, url: str, what: str, channel: str) -> None:
    from engine.notify import compose
    from engine.notify.sender import send_now

    drafts = compose.billing_link(settings, user, url, what=what, key=f"billing:{uuid.uuid4().hex}", channel=channel)
    for row in asyncio.run(send_now(settings, db, drafts)):
        typer.echo(f"{row.channel}: {row.status}" + (f" ({row.last_error})" if row.last_error else ""), err=True)
