"""The one Twilio REST client: SMS out, recent SMS (to settle a send in doubt), live-call
updates, voicemail audio.

Everything in xswarm that talks to Twilio's REST API goes through ``TwilioClient``: the
outbox's SMS, replies sent after the webhook answered, the bridge's hang-up and the
supervisor's transfer. It is the twilio SDK's own async client (``AsyncTwilioHttpClient``, on
aiohttp), which fits the asyncio servers, with two adaptations in ``_SessionHttpClient``:

- it runs on the caller's ``aiohttp.ClientSession`` (the SDK otherwise opens its own, which
  must be created inside a running loop and closed separately);
- every request gets a timeout: the SDK's async client hands aiohttp ``timeout=None``,
  which aiohttp reads as "no timeout at all";
- Basic auth goes in as a header (the SDK's ``aiohttp.BasicAuth`` is deprecated in aiohttp 3.14).

``twilio.api_base`` replaces the SDK's ``https://api.twilio.com`` (tests run a local fake). The
SDK is imported when a client is built, so ``xswarm --help`` never loads it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import aiohttp

from engine.config import TwilioSettings, secret
from engine.logging_setup import mask_contacts

NOT_FOUND = 20404
"""Twilio's error code for a resource that does not exist (e.g. a call that already ended)."""
UNSUBSCRIBED = 21610
"""Twilio's error code for a message to a number that texted STOP to ours."""
RECORDING_LIMIT = 32 * 1024 * 1024
"""Largest recording we fetch (a 2-minute voicemail is about 1 MB as MP3, 2 MB as WAV)."""
RECORDING_SID = re.compile(r"RE[0-9A-Za-z]{1,62}")
"""What may stand for a RecordingSid in a media URL (Twilio's are RE + 32 hex digits)."""


class TwilioError(Exception):
    """Twilio answered with an error: ``status`` (HTTP) and ``code`` (Twilio's, when given).
    The request was refused, so nothing was sent or changed."""

    expected = True
    """A provider refusal, not a bug: logged without a traceback."""

    def __init__(self, message: str, status: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class TwilioUnreachable(TwilioError):
    """No answer from Twilio (connection error or timeout). For a create request this means
    "unknown": Twilio may have acted before the answer was lost."""


@dataclass(frozen=True)
class SentSms:
    sid: str
    to: str
    from_: str
    body: str
    created: datetime | None


def credentials(twilio: TwilioSettings) -> tuple[str, str] | None:
    """(account_sid, auth_token), or None when either is unset."""
    token = secret(twilio.auth_token)
    return (twilio.account_sid, token) if twilio.account_sid and token else None


class TwilioClient:
    def __init__(self, twilio: TwilioSettings, session: aiohttp.ClientSession, *, timeout_s: float = 15.0) -> None:
        self.settings = twilio
        self._session = session
        self._timeout_s = timeout_s
        self._sdk: Any = None

    def _client(self) -> Any:
        if self._sdk is None:
            creds = credentials(self.settings)
            if creds is None:
                raise TwilioError("TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN not configured")
            from twilio.rest import Client

            client = Client(creds[0], creds[1], http_client=_http_client(self._session, self._timeout_s))
            client.api.base_url = self.settings.api_base.rstrip("/")
            self._sdk = client
        return self._sdk

    async def send_sms(self, *, to: str, from_: str, body: str) -> str:
        """Send one SMS; returns its message sid."""
        message = await _call(self._client().messages.create_async(to=to, from_=from_, body=body))
        return str(message.sid)

    async def recent_sms(self, *, to: str, from_: str, limit: int = 50) -> list[SentSms]:
        """The newest messages from ``from_`` to ``to`` (newest first, at most ``limit``).
        Queued messages have no ``date_sent`` yet, so this filters by the numbers only."""
        found = await _call(self._client().messages.list_async(to=to, from_=from_, limit=limit))
        return [SentSms(str(m.sid), str(m.to), str(m.from_), m.body or "", m.date_created) for m in found]

    async def recording(self, recording_sid: str, fmt: Literal["mp3", "wav"], *, limit: int = RECORDING_LIMIT) -> bytes:
        """A recording's audio (MP3 for the browser link, WAV for the operator's download).
        The SDK fetches a recording's metadata only, so this is a plain authenticated GET of
        its media URL, built here from ``api_base`` and the SID: never from a URL a webhook
        brought, which could send our credentials anywhere."""
        creds = credentials(self.settings)
        if creds is None:
            raise TwilioError("TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN not configured")
        if not RECORDING_SID.fullmatch(recording_sid):
            raise TwilioError(f"{recording_sid!r} is not a Twilio RecordingSid")
        base = self.settings.api_base.rstrip("/")
        url = f"{base}/2010-04-01/Accounts/{creds[0]}/Recordings/{recording_sid}.{fmt}"
        headers = {"Authorization": aiohttp.encode_basic_auth(*creds)}
        try:
            async with self._session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=self._timeout_s)
            ) as resp:
                if resp.status != 200:
                    raise TwilioError(f"Twilio answered {resp.status} for recording {recording_sid}", resp.status)
                data = await resp.content.read(limit + 1)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TwilioUnreachable(f"Twilio unreachable: {exc!r}") from None
        if len(data) > limit:
            raise TwilioError(f"recording {recording_sid} is over {limit} bytes")
        return data

    async def update_call(self, call_sid: str, **params: str) -> None:
        """Change a live call (``status="completed"``, ``twiml=…``)."""
        await _call(self._client().calls(call_sid).update_async(**params))


@asynccontextmanager
async def open_client(twilio: TwilioSettings, *, timeout_s: float = 15.0) -> AsyncIterator[TwilioClient]:
    """A client on its own short-lived session, for one-off actions (hang-up, transfer)."""
    async with aiohttp.ClientSession() as session:
        yield TwilioClient(twilio, session, timeout_s=timeout_s)


async def _call(awaitable: Any) -> Any:
    """Await an SDK call, turning its failures into ``TwilioError`` / ``TwilioUnreachable``."""
    from twilio.base.exceptions import TwilioRestException

    try:
        return await awaitable
    except TwilioRestException as exc:
        # Twilio's messages quote the numbers they refuse: masked before they reach a log or a row.
        text = mask_contacts(str(exc.msg)[:300])
        raise TwilioError(f"Twilio answered {exc.status} (code {exc.code}): {text}", exc.status, exc.code) from None
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise TwilioUnreachable(f"Twilio unreachable: {exc!r}") from None
    except ValueError as exc:  # an answer that is not the JSON Twilio sends
        raise TwilioUnreachable(f"Twilio's answer could not be read: {exc}") from None


def _http_client(session: aiohttp.ClientSession, timeout_s: float) -> Any:
    from twilio.http.async_http_client import AsyncTwilioHttpClient

    class _SessionHttpClient(AsyncTwilioHttpClient):
        """The SDK's async client on our session, with a default timeout (see the module doc)."""

        def __init__(self) -> None:
            super().__init__(pool_connections=False, timeout=timeout_s)
            self.session = session

        async def request(
            self,
            method: str,
            url: str,
            params: Any = None,
            data: Any = None,
            headers: dict[str, str] | None = None,
            auth: tuple[str, str] | None = None,
            timeout: float | None = None,
            allow_redirects: bool = False,
        ) -> Any:
            headers = dict(headers or {})
            if auth is not None:
                headers["Authorization"] = aiohttp.encode_basic_auth(auth[0], auth[1])
            return await super().request(
                method, url, params, data, headers, None, timeout or self.timeout, allow_redirects
            )

    return _SessionHttpClient()
