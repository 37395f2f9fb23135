"""Messages we send: SMS through Twilio's REST API, email through SendGrid's send API.

Both are plain aiohttp calls with base URLs from settings (tests run local fakes). A failure
raises ``SendError`` so the inbox processor retries the event with backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from engine.config import Settings, secret
from engine.logging_setup import mask_contacts

SEND_TIMEOUT = aiohttp.ClientTimeout(total=15)


class SendError(Exception):
    """The provider did not accept the message (retryable)."""

    expected = True
    """A provider outage, not a bug: logged without a traceback."""


@dataclass
class TwilioRest:
    session: aiohttp.ClientSession
    account_sid: str | None
    auth_token: str | None
    base_url: str

    @classmethod
    def from_settings(cls, settings: Settings, session: aiohttp.ClientSession) -> TwilioRest:
        return cls(
            session, settings.twilio.account_sid, secret(settings.twilio.auth_token), settings.twilio.api_base_url
        )

    @property
    def configured(self) -> bool:
        return bool(self.account_sid and self.auth_token)

    async def send_sms(self, *, to: str, from_: str, body: str) -> str:
        """Send one SMS; returns Twilio's message sid."""
        if not self.configured:
            raise SendError("TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN not configured")
        url = f"{self.base_url.rstrip('/')}/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        data = await _post(
            self.session,
            url,
            data={"To": to, "From": from_, "Body": body},
            headers={"Authorization": aiohttp.encode_basic_auth(self.account_sid or "", self.auth_token or "")},
        )
        sid = data.get("sid") if isinstance(data, dict) else None
        if not isinstance(sid, str):
            raise SendError("Twilio accepted the message but returned no sid")
        return sid


@dataclass
class SendGridMail:
    session: aiohttp.ClientSession
    api_key: str | None
    from_email: str | None
    base_url: str

    @classmethod
    def from_settings(cls, settings: Settings, session: aiohttp.ClientSession) -> SendGridMail:
        return cls(
            session, secret(settings.sendgrid.api_key), settings.sendgrid.from_email, settings.sendgrid.api_base_url
        )

    @property
    def configured(self) -> bool:
        return bool(self.api_key and self.from_email)

    async def send(self, *, to: str, subject: str, text: str, in_reply_to: str | None) -> str | None:
        """Send a plain-text reply threaded under ``in_reply_to``; returns SendGrid's
        ``X-Message-Id`` (the prefix of the ``sg_message_id`` its events carry)."""
        if not self.configured:
            raise SendError("SENDGRID_API_KEY / SENDGRID_FROM_EMAIL not configured")
        body: dict[str, Any] = {
            "personalizations": [{"to": [{"email": to}]}],
            "from": {"email": self.from_email},
            "subject": subject,
            "content": [{"type": "text/plain", "value": text}],
        }
        if in_reply_to:
            body["headers"] = {"In-Reply-To": in_reply_to, "References": in_reply_to}
        url = f"{self.base_url.rstrip('/')}/v3/mail/send"
        try:
            async with self.session.post(
                url, json=body, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=SEND_TIMEOUT
            ) as resp:
                if resp.status not in (200, 202):
                    raise SendError(f"SendGrid answered {resp.status}: {mask_contacts((await resp.text())[:200])}")
                return resp.headers.get("X-Message-Id")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SendError(f"SendGrid unreachable: {exc!r}") from None


async def _post(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> Any:
    try:
        async with session.post(url, timeout=SEND_TIMEOUT, **kwargs) as resp:
            if resp.status not in (200, 201):
                raise SendError(f"{url} answered {resp.status}: {mask_contacts((await resp.text())[:200])}")
            return await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        raise SendError(f"{url} failed: {exc!r}") from None
