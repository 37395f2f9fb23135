"""The one SendGrid client: ``POST /v3/mail/send`` on our aiohttp session.

Why not the sendgrid SDK's ``SendGridAPIClient``: it sends through ``python_http_client``
(blocking urllib), which stalls the event loop of the server that sends for the whole request
(measured in docs/performance.md). The SDK's
``Mail`` helper still builds the request body (text part before HTML, headers, custom args).
``sendgrid.api_base`` replaces ``https://api.sendgrid.com`` (tests run a local fake).
SendGrid has no idempotency key; ``engine.notify.sender`` settles a send in doubt with the
``processed`` event that carries the outbox id in ``custom_args``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from engine.config import SendGridSettings, secret
from engine.logging_setup import mask_contacts


class SendGridError(Exception):
    """SendGrid refused the message (``status`` is its HTTP answer); nothing was sent."""

    expected = True
    """A provider refusal, not a bug: logged without a traceback."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SendGridUnreachable(SendGridError):
    """No answer (connection error or timeout): SendGrid may have taken the message."""


@dataclass(frozen=True)
class Email:
    to: str
    subject: str
    text: str
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    custom_args: dict[str, str] = field(default_factory=dict)


class SendGridClient:
    def __init__(self, sendgrid: SendGridSettings, session: aiohttp.ClientSession, *, timeout_s: float = 15.0) -> None:
        self.settings = sendgrid
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    @property
    def configured(self) -> bool:
        return bool(secret(self.settings.api_key) and self.settings.from_email)

    @property
    def from_email(self) -> str | None:
        return self.settings.from_email

    async def send(self, email: Email) -> str | None:
        """Send one email; returns SendGrid's ``X-Message-Id`` (the prefix of the
        ``sg_message_id`` its events carry)."""
        if not self.configured:
            raise SendGridError("SENDGRID_API_KEY / SENDGRID_FROM_EMAIL not configured")
        from sendgrid.helpers.mail import CustomArg, Header, Mail

        mail = Mail(
            from_email=self.settings.from_email,
            to_emails=email.to,
            subject=email.subject,
            plain_text_content=email.text,
            html_content=email.html,
        )
        for name, value in email.headers.items():
            mail.header = Header(name, value)
        for name, value in email.custom_args.items():
            mail.custom_arg = CustomArg(name, value)
        url = f"{self.settings.api_base.rstrip('/')}/v3/mail/send"
        headers = {"Authorization": f"Bearer {secret(self.settings.api_key)}"}
        try:
            async with self._session.post(url, json=mail.get(), headers=headers, timeout=self._timeout) as resp:
                if resp.status not in (200, 202):
                    text = mask_contacts((await resp.text())[:200])
                    raise SendGridError(f"SendGrid answered {resp.status}: {text}", resp.status)
                return resp.headers.get("X-Message-Id")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SendGridUnreachable(f"SendGrid unreachable: {exc!r}") from None
