"""Reading request bodies with a hard size limit, and parsing Twilio's form encoding.

Why our own reader: aiohttp's ``client_max_size`` is one number per application, but Inbound
Parse mail may be 30 MB while every other route should stop at 1 MiB. Reading the stream here
lets each route pick its limit and refuse early from ``Content-Length``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

MIB = 1024 * 1024
DEFAULT_LIMIT = 1 * MIB
INBOUND_MAIL_LIMIT = 30 * MIB
FORM_LIMIT = 64 * 1024
"""Twilio's forms: an SMS of 1,600 characters and ~30 fields is a few KiB."""
MAX_FORM_FIELDS = 200
"""Twilio sends 20–30 fields. Counted on the raw bytes, before anything is parsed, so a form
of 100,000 fields costs a scan, not a parse plus an HMAC over every field."""
MAX_FIELD_NAME = 64
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)
"""Where an app keeps ``server.request_timeout_s``."""


def _too_large(limit: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=limit + 1, text=f"body over {limit} bytes")


async def read_chunks(
    request: web.Request, limit: int = DEFAULT_LIMIT, feed: Callable[[bytes], object] | None = None
) -> list[bytes]:
    """The body as it arrived, each chunk handed to ``feed`` first (e.g. a digest's
    ``update``, so a signature is checked without a second pass over a whole copy). 413 as
    soon as the body is known to exceed ``limit``; 408 when it takes longer than the app's
    ``BODY_TIMEOUT_S`` to arrive (a slow sender holds a connection and its buffer for as
    long as we wait)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(request.app.get(BODY_TIMEOUT_S, 20.0)):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                if feed is not None:
                    feed(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="request body too slow") from None
    return chunks


def joined(chunks: list[bytes]) -> bytes:
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


async def read_body(request: web.Request, limit: int = DEFAULT_LIMIT) -> bytes:
    """The whole body (see ``read_chunks``)."""
    return joined(await read_chunks(request, limit))


def parse_form(request: web.Request, raw: bytes) -> MultiDict[str]:
    """``application/x-www-form-urlencoded`` as Twilio posts it; 400/415 for anything else."""
    ctype = request.content_type
    if ctype != "application/x-www-form-urlencoded":
        raise web.HTTPUnsupportedMediaType(text="expected application/x-www-form-urlencoded")
    if raw.count(b"&") >= MAX_FORM_FIELDS:
        raise web.HTTPBadRequest(text=f"more than {MAX_FORM_FIELDS} form fields")
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise web.HTTPBadRequest(text="malformed form body") from None
    if any(len(name) > MAX_FIELD_NAME for name, _ in pairs):
        raise web.HTTPBadRequest(text=f"form field name over {MAX_FIELD_NAME} characters")
    return MultiDict(pairs)
