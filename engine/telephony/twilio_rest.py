"""Update a live call through Twilio's REST API (``POST …/Calls/{CallSid}.json``).

Two actions change a call that Twilio is carrying: the supervisor's transfer (new ``Twiml``
with a ``<Dial>``) and our own hang-up (``Status=completed``). Both need the same URL, the same
Basic auth and the same error handling, so they share this one request. aiohttp is imported
inside the call: only these actions need an HTTP client, and ``xswarm --help`` must stay light.
"""

from __future__ import annotations

from typing import Any

from engine.config import secret


class TwilioUnreachable(Exception):
    """No answer from Twilio (connection error or timeout); the message says which."""


def credentials(twilio: Any) -> tuple[str, str] | None:
    """(account_sid, auth_token) from the ``twilio`` settings section, or None when either is unset."""
    token = secret(twilio.auth_token)
    return (twilio.account_sid, token) if twilio.account_sid and token else None


async def update_call(twilio: Any, call_sid: str, data: dict[str, str], *, timeout_s: float) -> tuple[int, str]:
    """POST ``data`` to the call's resource; returns (HTTP status, body text).

    ``twilio`` is the settings section (account_sid, auth_token, api_base_url). The caller
    decides what a status means (404 is "already ended" for a hang-up, a failure for a
    transfer). Raises ``TwilioUnreachable`` when no HTTP answer came, ``ValueError`` when the
    credentials are not configured.
    """
    creds = credentials(twilio)
    if creds is None:
        raise ValueError("Twilio credentials (account_sid, auth_token) are not configured")
    import aiohttp

    account, token = creds
    url = f"{twilio.api_base_url.rstrip('/')}/2010-04-01/Accounts/{account}/Calls/{call_sid}.json"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            auth = {"Authorization": aiohttp.encode_basic_auth(account, token)}
            async with http.post(url, data=data, headers=auth) as resp:
                return resp.status, await resp.text()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise TwilioUnreachable(str(exc) or type(exc).__name__) from None
