"""SendGrid: Inbound Parse (email to the assistant) and the Event Webhook (delivery status).

Inbound Parse may carry 30 MB of mail; the body is verified as received, parsed off the
event loop, attachments go to object storage (content-addressed, so retries store nothing
twice) and the inbox keeps the text fields and attachment metadata. SendGrid drops mail on
4xx, so everything transient is a 5xx. Events arrive as a JSON array: one inbox row per
``sg_event_id``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from email import policy
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.utils import parseaddr
from typing import Any

from aiohttp import web

from engine.events import MessageReceived
from engine.logging_setup import mask_email
from engine.notify import compose
from engine.notify.sender import OUTBOX_ARG
from engine.notify.sendgrid_client import Email
from engine.storage.base import ObjectStore
from engine.store import messages, outbox, usage
from engine.store.db import Statement
from engine.store.inbox import InboxRow
from engine.store.users import User, find_by_email
from engine.tiers import TIERS
from webhooks.body import DEFAULT_LIMIT, INBOUND_MAIL_LIMIT
from webhooks.hub import HUB, Hub, Outcome
from webhooks.processor import PermanentError, received

log = logging.getLogger("xswarm.webhooks.sendgrid")
PARSE = "sendgrid-parse"
EVENTS = "sendgrid-events"
_TEXT_FIELDS = (
    "from",
    "to",
    "cc",
    "subject",
    "text",
    "html",
    "headers",
    "envelope",
    "spam_score",
    "SPF",
    "dkim",
    "sender_ip",
)


class MailFormatError(ValueError):
    pass


def parse_inbound(content_type: str, raw: bytes) -> tuple[dict[str, str], list[tuple[str, str, bytes]]]:
    """Split a multipart/form-data body into text fields and files (name, type, bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise MailFormatError("expected multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + raw)
    if not message.is_multipart() or message.defects:
        raise MailFormatError("malformed multipart body")
    fields: dict[str, str] = {}
    files: list[tuple[str, str, bytes]] = []
    for part in message.iter_parts():
        data = _decoded(part)
        filename = part.get_filename()
        if filename:
            files.append((filename, part.get_content_type(), data))
            continue
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            fields[name] = data.decode(part.get_content_charset() or "utf-8", "replace")
    if "email" in fields:
        _expand_raw(fields, files)
    return fields, files


def _expand_raw(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> None:
    """Raw mode ("POST the raw, full MIME message"): the parts parsed mode would have sent."""
    mime = BytesParser(policy=policy.default).parsebytes(fields.pop("email").encode("utf-8", "replace"))
    fields["headers"] = "".join(f"{k}: {v}\n" for k, v in mime.items())
    for name in ("from", "to", "cc", "subject"):
        if mime.get(name) is not None:
            fields.setdefault(name, str(mime[name]))
    for kind in ("plain", "html"):
        body = mime.get_body(preferencelist=(kind,))
        if body is not None:
            fields.setdefault("text" if kind == "plain" else "html", str(body.get_content()))
    for attachment in mime.iter_attachments():
        files.append((attachment.get_filename() or "attachment", attachment.get_content_type(), _decoded(attachment)))


def _decoded(part: Message) -> bytes:
    """A leaf part's body with its transfer encoding undone (a multipart part has none)."""
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def message_id(fields: dict[str, str], raw: bytes) -> str:
    """The mail's Message-ID, or a digest of the body when it has none."""
    found = HeaderParser().parsestr(fields.get("headers", ""), headersonly=True).get("Message-ID")
    return str(found).strip() if found else "sha256:" + hashlib.sha256(raw).hexdigest()


def _store_files(store: ObjectStore, files: list[tuple[str, str, bytes]]) -> list[dict[str, Any]]:
    """Attachments into object storage (blocking; runs on the hub's storage pool)."""
    out = []
    for filename, ctype, data in files:
        digest = hashlib.sha256(data).hexdigest()
        key = f"mail-attachments/{digest}"
        if not store.exists(key):
            store.put_bytes(key, data)
        out.append({"filename": filename[:200], "type": ctype, "size": len(data), "sha256": digest, "key": key})
    return out


async def inbound(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    raw = await hub.sendgrid.read(request, INBOUND_MAIL_LIMIT)
    try:
        fields, files = await asyncio.to_thread(parse_inbound, request.headers.get("Content-Type", ""), raw)
    except MailFormatError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    try:
        attachments = await hub.in_storage(lambda store: _store_files(store, files)) if files else []
    except Exception as exc:  # storage down or misconfigured: 5xx so SendGrid retries
        log.error("inbound mail: attachments not stored (answering 503): %s", exc)
        raise web.HTTPServiceUnavailable(text="attachment storage unavailable") from None
    mid = message_id(fields, raw)
    payload: dict[str, Any] = {name: fields[name] for name in _TEXT_FIELDS if name in fields}
    payload["message_id"] = mid
    payload["attachments"] = attachments
    await hub.ingest(PARSE, mid, "inbound", json.dumps(payload, separators=(",", ":")))
    return web.Response(text="OK")


def _sender(payload: dict[str, Any]) -> str | None:
    try:
        envelope = json.loads(payload.get("envelope") or "{}")
        if isinstance(envelope, dict) and isinstance(envelope.get("from"), str) and envelope["from"]:
            return envelope["from"]
    except ValueError:
        pass
    address = parseaddr(payload.get("from", ""))[1]
    return address or None


async def inbound_effect(hub: Hub, row: InboxRow) -> Outcome:
    try:
        mail = json.loads(row.payload)
    except ValueError:
        raise PermanentError("stored mail is not JSON") from None
    sender = _sender(mail)
    user = await hub.read(lambda d: find_by_email(d, sender)) if sender else None
    subject = mail.get("subject", "")
    text = mail.get("text") or _strip_html(mail.get("html", ""))
    mid = row.event_id
    statements = [
        messages.insert_statement(
            channel="email",
            direction="in",
            provider_id=mid,
            user_id=user.id if user else None,
            from_addr=sender,
            to_addr=mail.get("to"),
            subject=subject,
            body=text,
            status="received",
            meta={"attachments": mail.get("attachments", []), "spam_score": mail.get("spam_score")},
            at_ms=row.received_at,
        )
    ]
    quota: list[Statement] = []
    if user is not None and sender:
        statements += usage.count_statements("email", f"email:{mid}", user.id, 1, row.received_at)
        if user.tier in TIERS:
            period = usage.period_of(row.received_at)
            quota = compose.quota_statements(hub.settings, user, TIERS[user.tier], "email", period)
        statements += quota  # judged on the count just incremented
        statements += await _reply(hub, user, sender, subject, text, mid)
    summary = f"Email from {user.name if user else 'unknown'} ({mask_email(sender)}): {subject[:80]}"
    uid = user.id if user else None
    return Outcome(
        statements, [MessageReceived("email", uid, summary), received(row, summary, uid)], notify=bool(quota)
    )


async def _reply(hub: Hub, user: User, sender: str, subject: str, text: str, mid: str) -> list[Statement]:
    """Send the reply once: a retry after a sent reply finds its row and stops."""
    already = await hub.read(
        lambda d: d.query(
            "SELECT 1 FROM messages WHERE channel = 'email' AND direction = 'out'"
            " AND json_extract(meta, '$.in_reply_to') = ?",
            (mid,),
        )
    )
    if already:
        return []
    assert hub.mail is not None
    if not hub.mail.configured:
        log.info("email from %s not answered: SendGrid sending is not configured", mask_email(sender))
        return []
    body = await hub.replier.email(user, subject, text)
    reply_subject = subject if subject.lower().startswith("re:") else f"Re: {subject}"
    threading = None if mid.startswith("sha256:") else mid
    headers = {"In-Reply-To": threading, "References": threading} if threading else {}
    sent_id = await hub.mail.send(Email(to=sender, subject=reply_subject, text=body, headers=headers))
    return [
        messages.insert_statement(
            channel="email",
            direction="out",
            provider_id=sent_id or f"reply:{mid}",
            user_id=user.id,
            from_addr=hub.mail.from_email,
            to_addr=sender,
            subject=reply_subject,
            body=body,
            status="sent",
            meta={"in_reply_to": mid},
        )
    ]


def _strip_html(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


async def events(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    raw = await hub.sendgrid.read(request, DEFAULT_LIMIT)
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise web.HTTPBadRequest(text="body is not JSON") from None
    if not isinstance(items, list):
        raise web.HTTPBadRequest(text="expected a JSON array of events")
    rows: list[tuple[str, str | None, str]] = []
    try:
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("sg_event_id"), str) and item["sg_event_id"]:
                rows.append((item["sg_event_id"], str(item.get("event", "")), json.dumps(item, separators=(",", ":"))))
            else:
                log.warning("SendGrid event without sg_event_id skipped")
    except RecursionError:
        raise web.HTTPBadRequest(text="event nested too deep") from None
    if rows:
        await hub.ingest_many(EVENTS, rows)
    return web.Response(text="OK")


async def events_effect(hub: Hub, row: InboxRow) -> Outcome:
    try:
        item = json.loads(row.payload)
    except ValueError:
        raise PermanentError("stored event is not JSON") from None
    kind = str(item.get("event", ""))
    sg_message_id = str(item.get("sg_message_id") or "")
    statements = []
    outbox_id = item.get(OUTBOX_ARG)
    if isinstance(outbox_id, str) and outbox_id:
        # Any event for a mail of ours means SendGrid took it: this settles a send in doubt.
        statements += outbox.sent_statements(
            outbox_id, sg_message_id.split(".")[0] or None, note="settled: SendGrid event"
        )
    if sg_message_id and kind in messages.STATUS_RANK:
        statements.append(messages.status_statement(sg_message_id.split(".")[0], kind))
    summary = f"Email {kind} for {mask_email(item.get('email'))}"
    return Outcome(statements, [received(row, summary)])
