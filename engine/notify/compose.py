"""What each notification says, and on which channels it goes.

A notification goes to every channel the recipient can be reached on and we can send on:
SMS when they have a phone and Twilio (credentials and ``twilio.from_number``) is set up,
email when they have an address and SendGrid (key and ``sendgrid.from_email``) is. Each
channel is its own outbox row (``<key>:sms``, ``<key>:email``), so one failing never holds
up or repeats the other. Texts are plain and short (a voicemail's transcript is clipped in
the SMS; links are never cut), and every SMS kind except billing links says how to stop.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from engine.config import Settings, secret
from engine.store.outbox import Draft, Statement, enqueue_statement
from engine.store.users import User
from engine.telephony.twilio_rest import credentials
from engine.tiers import Tier

STOP_HINT = " Reply STOP to opt out."


@dataclass(frozen=True)
class Recipient:
    """Who a notification is for: a user, or the operator (no user id, email only)."""

    user_id: str | None
    name: str
    phone: str | None
    email: str | None

    @classmethod
    def of(cls, user: User) -> Recipient:
        return cls(user.id, user.name, user.phone, user.email)


def clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters, cut at a word with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,.;:") + "…"


def sms_ready(settings: Settings) -> bool:
    return credentials(settings.twilio) is not None and bool(settings.twilio.from_number)


def email_ready(settings: Settings) -> bool:
    return bool(secret(settings.sendgrid.api_key) and settings.sendgrid.from_email)


def reachable(settings: Settings, to: Recipient, channel: str) -> bool:
    """Whether ``to`` can get a message on ``channel``: an address, and the provider set up."""
    if channel == "sms":
        return bool(to.phone) and sms_ready(settings)
    return bool(to.email) and email_ready(settings)


def html_of(text: str) -> str:
    """The HTML part: the plain text, escaped, one paragraph per blank-line block, links
    clickable."""
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    paragraphs = (_LINK.sub(r'<a href="\1">\1</a>', html.escape(b)).replace("\n", "<br>") for b in blocks)
    return "".join(f"<p>{p}</p>" for p in paragraphs)


_LINK = re.compile(r"(https?://[^\s<\"]+)")


def drafts(
    settings: Settings,
    to: Recipient,
    kind: str,
    key: str,
    *,
    sms: str | None,
    subject: str | None,
    text: str | None,
    channels: tuple[str, ...] = ("sms", "email"),
) -> list[Draft]:
    """One draft per channel that applies (see the module doc)."""
    out: list[Draft] = []
    if "sms" in channels and sms and to.phone and reachable(settings, to, "sms"):
        out.append(
            Draft(
                f"{key}:sms",
                kind,
                "sms",
                to.user_id,
                to.phone,
                sms,
                from_addr=settings.twilio.from_number,
            )
        )
    if "email" in channels and text and subject and to.email and reachable(settings, to, "email"):
        out.append(
            Draft(
                f"{key}:email",
                kind,
                "email",
                to.user_id,
                to.email,
                text,
                from_addr=settings.sendgrid.from_email,
                subject=subject,
                html=html_of(text),
            )
        )
    return out


def _our_number(settings: Settings) -> str:
    return settings.twilio.from_number or "our number"


def welcome(settings: Settings, user: User, channels: tuple[str, ...] = ("sms", "email")) -> list[Draft]:
    number = _our_number(settings)
    sms = (
        f"Welcome to xswarm, {user.name}! Call or text {number} to reach your assistant. "
        "Text HELP for commands, UPGRADE to subscribe." + STOP_HINT
    )
    text = (
        f"Hello {user.name},\n\nwelcome to xswarm. Your assistant answers at {number}: call it to talk, "
        "or text it. Text HELP for the commands, STATUS for your plan and usage, UPGRADE for a link to "
        "subscribe and BILLING to manage a subscription.\n\nYour xswarm assistant"
    )
    return drafts(
        settings,
        Recipient.of(user),
        "welcome",
        f"welcome:{user.id}",
        sms=sms,
        subject="Welcome to xswarm",
        text=text,
        channels=channels,
    )


def voicemail(
    settings: Settings,
    to: Recipient,
    *,
    recording_sid: str,
    caller: str | None,
    seconds: float | None,
    transcript: str | None,
    listen: str | None,
) -> list[Draft]:
    """A voicemail left when no line was free, with its transcript or a notice that it has
    none. ``caller`` None: the recipient left it themself (a receipt); else who left it."""
    length = f"{seconds:.0f} s" if seconds else "length unknown"
    heard = f'"{clip(transcript, 160)}"' if transcript else "(no transcript)"
    link = f" Listen: {listen}" if listen else ""
    if caller is None:
        sms = f"xswarm saved your voicemail ({length}): {heard}.{link} We'll get back to you."
        opening = f"every line was busy when you called, so your voicemail ({length}) was saved."
        subject = "Your voicemail to xswarm"
    else:
        sms = f"xswarm voicemail from {caller} ({length}): {heard}.{link}"
        opening = f"{caller} left a voicemail ({length}) while every line was busy."
        subject = f"Voicemail from {caller}"
    text = (
        f"Hello {to.name},\n\n{opening}\n\n"
        + (f"Transcript:\n{transcript.strip()}" if transcript else "There is no transcript of this message.")
        + (f"\n\nListen: {listen}" if listen else "")
        + "\n\nYour xswarm assistant"
    )
    return drafts(
        settings, to, "voicemail", f"voicemail:{recording_sid}", sms=sms + STOP_HINT, subject=subject, text=text
    )


QUOTA_COLUMN = {"voice": "voice_seconds", "sms": "sms_count", "email": "email_count"}
_QUOTA_UNIT = {"voice": "voice minutes", "sms": "texts", "email": "email replies"}
THRESHOLDS = (80, 100)


def quota_statements(settings: Settings, user: User, plan: Tier, resource: str, period: str) -> list[Statement]:
    """Enqueue statements for the 80 % and 100 % notices of one resource, each conditional on
    the usage committed in the same transaction (put them after the increment). One row per
    user, resource, period and threshold, so each notice goes out once a month at most."""
    limit = {"voice": plan.voice_minutes, "sms": plan.sms, "email": plan.email}[resource]
    if limit is None or limit <= 0:
        return []
    column, unit = QUOTA_COLUMN[resource], _QUOTA_UNIT[resource]
    scale = 60 if resource == "voice" else 1
    out: list[Statement] = []
    for percent in THRESHOLDS:
        if percent == 100:
            sms = f"You've used all {limit} {unit} of your {plan.name} plan for {period}. Text UPGRADE for more."
        else:
            sms = f"You've used {percent}% of the {limit} {unit} in your {plan.name} plan for {period}."
        text = (
            f"Hello {user.name},\n\n{sms}\n\nText STATUS for details, or UPGRADE for a bigger plan."
            "\n\nYour xswarm assistant"
        )
        threshold = limit * scale * percent / 100
        when = (
            f"(SELECT COALESCE(MAX({column}), 0) FROM usage WHERE user_id = ? AND period = ?) >= ?",
            (user.id, period, threshold),
        )
        key = f"quota_{percent}:{resource}:{user.id}:{period}"
        subject = f"xswarm: {percent}% of your {unit} used"
        for draft in drafts(
            settings, Recipient.of(user), "quota", key, sms=sms + STOP_HINT, subject=subject, text=text
        ):
            out.append(enqueue_statement(draft, when=when))
    return out


def payment_failed(settings: Settings, user: User, *, invoice_id: str, attempt: int, amount: str) -> list[Draft]:
    """One notice per (invoice, attempt), as Stripe retries a failing card."""
    sms = f"xswarm: your payment of {amount} didn't go through. Text BILLING for a secure link to update your card."
    text = (
        f"Hello {user.name},\n\nyour payment of {amount} for xswarm did not go through (attempt {attempt}). "
        f"Text BILLING to {_our_number(settings)} for a secure link to update your card; Stripe will try "
        "again.\n\nYour xswarm assistant"
    )
    return drafts(
        settings,
        Recipient.of(user),
        "payment_failed",
        f"payment_failed:{invoice_id}:{attempt}",
        sms=sms + STOP_HINT,
        subject="xswarm: payment failed",
        text=text,
    )


def billing_link(settings: Settings, user: User, url: str, *, what: str, key: str, channel: str) -> list[Draft]:
    """A Checkout or Customer Portal link an operator sends (``billing link --send``)."""
    sms = f"xswarm: {what}: {url}"
    text = f"Hello {user.name},\n\n{what}:\n{url}\n\nYour xswarm assistant"
    return drafts(
        settings, Recipient.of(user), "billing", key, sms=sms, subject=f"xswarm: {what}", text=text, channels=(channel,)
    )
