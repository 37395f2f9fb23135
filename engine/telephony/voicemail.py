"""Fetch a voicemail's audio from Twilio (``RecordingUrl`` + ``.wav``, Basic auth).

Twilio keeps voicemail audio; the voicemail webhook stores only its ``RecordingUrl``. That URL
came in over the internet, so the account's credentials are sent only when it points at the
configured Twilio API host (``twilio.api_base``) over the same scheme: a forged URL in a
webhook must never collect our auth token. The download lands in a temp file beside the
destination and is renamed into place only when complete.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.telephony.twilio_rest import credentials

TIMEOUT_S = 60.0
MAX_BYTES = 200 * 2**20
"""Twilio caps a voicemail's length; anything bigger than this is not a voicemail."""


class VoicemailError(Exception):
    """The audio could not be fetched; the message says why, for the operator."""


def audio_url(twilio: Any, recording_url: str) -> str:
    """The WAV URL for a stored ``RecordingUrl``, refused unless it is on the Twilio API host."""
    if not recording_url:
        raise VoicemailError("this voicemail has no recording URL")
    api, given = urlsplit(twilio.api_base), urlsplit(recording_url)
    if (given.scheme, given.netloc) != (api.scheme, api.netloc):
        raise VoicemailError(f"recording URL {recording_url!r} is not on {twilio.api_base}; not sending credentials")
    return recording_url if recording_url.endswith(".wav") else f"{recording_url}.wav"


def download_voicemail(settings: Any, recording_url: str, dest: Path) -> int:
    """Write the voicemail's WAV to ``dest``; returns its size in bytes."""
    creds = credentials(settings.twilio)
    if creds is None:
        raise VoicemailError("Twilio credentials (twilio.account_sid, TWILIO_AUTH_TOKEN) are not configured")
    url = audio_url(settings.twilio, recording_url)
    return asyncio.run(_fetch(url, creds, dest))


async def _fetch(url: str, creds: tuple[str, str], dest: Path) -> int:
    import aiohttp

    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent if str(dest.parent) else ".", prefix=f".{dest.name}.")
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as http:
                auth = {"Authorization": aiohttp.encode_basic_auth(*creds)}
                async with http.get(url, headers=auth) as resp:
                    if resp.status != 200:
                        raise VoicemailError(f"Twilio answered HTTP {resp.status} for {url}")
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if size > MAX_BYTES:
                            raise VoicemailError(f"{url} is larger than {MAX_BYTES >> 20} MiB; not a voicemail")
                        out.write(chunk)
        os.replace(tmp, dest)
        return size
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise VoicemailError(f"no answer from Twilio: {exc or type(exc).__name__}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
