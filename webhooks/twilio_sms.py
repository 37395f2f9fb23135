"""``POST /twilio/sms``: store the text, answer with TwiML, reply later if the LLM is slow.

Route: verify → store the raw form in the inbox → compose the reply for at most
``llm.sms_budget_s`` → answer ``<Message>`` inline, or empty TwiML if the reply is not ready.
Processor: store the inbound message, count it, and, when the route did not answer inline,
wait for the reply being composed (or compose it again after a restart) and send it through
Twilio's REST API. The outbound row's provider id ``reply:<MessageSid>`` makes that idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

from engine.events import MessageReceived
from engine.logging_setup import mask_phone
from engine.notify import compose
from engine.store import messages, optouts, usage
from engine.store.db import Statement, StoreError
from engine.store.inbox import InboxRow
from engine.store.users import User, find_by_phone
from engine.tiers import TIERS
from webhooks import twiml
from webhooks.body import FORM_LIMIT, parse_form, read_body
from webhooks.hub import HUB, Hub, Outcome
from webhooks.processor import PermanentError, received

log = logging.getLogger("xswarm.webhooks.sms")
PROVIDER = "twilio-sms"
HOLD_MARGIN_S = 2.0
"""How long past the SMS budget a row waiting on the LLM is kept from processors."""
_STATE = "sms-replies"
MAX_PENDING = 1024
"""Most pending replies kept in memory. The inbox row is the durable record and the map only
a fast path, so when the processor is off or behind, the oldest decided entries are dropped
rather than letting the map (and every full GC pass over it) grow with the backlog."""


@dataclass
class PendingReply:
    """A reply the route is composing; the processor sends it if the route could not."""

    task: asyncio.Future[str] | None = None
    user: User | None = None
    looked_up: bool = False
    """``user`` is the sender as the route found it (saves the processor a lookup)."""
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    inline: bool = False
    text: str = ""
    """What the route answered inline."""
    recorded: bool = False
    """The reply row was committed together with the inbox row."""
    form: MultiDict[str] | None = None
    """The posted form as the route parsed it (saves the processor parsing it again)."""
    created: float = field(default_factory=time.monotonic)


def _pending(hub: Hub) -> OrderedDict[str, PendingReply]:
    """An ``OrderedDict``, not a dict: entries leave from the front, and a plain dict's
    iteration walks every deleted slot before the first live one, which made ``_bound`` cost
    grow with the number of SMS answered since the last resize."""
    return hub.state.setdefault(_STATE, OrderedDict())


async def find_user(hub: Hub, phone: str | None) -> User | None:
    if not phone:
        return None
    return await hub.read(lambda d: find_by_phone(d, phone))


def reply_statement(
    sid: str, user: User | None, to: str | None, from_: str | None, text: str, meta: dict[str, str]
) -> Statement:
    """The outbound row of our reply to ``sid`` (its provider id makes it once-only)."""
    return messages.insert_statement(
        channel="sms",
        direction="out",
        provider_id=f"reply:{sid}",
        user_id=user.id if user else None,
        from_addr=from_,
        to_addr=to,
        body=text,
        status="sent",
        meta=meta,
    )


async def route(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    raw = await read_body(request, FORM_LIMIT)
    form = parse_form(request, raw)
    hub.twilio.check(request, form)
    sid = form.get("MessageSid") or form.get("SmsSid")
    if not sid:
        raise web.HTTPBadRequest(text="no MessageSid")
    pending = _pending(hub)
    if sid in pending:
        return twiml.response(twiml.EMPTY)  # a concurrent retry of a message being answered
    # Registered before the row exists, so the processor can never miss it and reply twice.
    entry = pending[sid] = PendingReply(form=form)
    _bound(pending)
    sender, ours, body = form.get("From"), form.get("To"), form.get("Body", "")
    try:
        try:
            # Reads only, no effects: safe before the row is stored.
            user, quick = await hub.read(lambda d: hub.replier.prepare_sms(d, sender, body))
        except StoreError:
            user, quick = None, None
            entry.looked_up = False
        else:
            entry.user, entry.looked_up = user, True
        word = optouts.keyword(body)
        if form.get("OptOutType") and word in optouts.STOP_WORDS | optouts.START_WORDS | optouts.HELP_WORDS:
            quick = ""  # Twilio's Advanced Opt-Out has answered this keyword itself
        opt = optouts.sms_statement(sender, word, int(time.time() * 1000)) if sender else None
        if quick is not None:
            # Keywords, commands and canned replies: the row, its reply and any STOP/START commit
            # together, so the reply is on record exactly when the message is, and a STOP holds
            # back every later message at once.
            statements = [reply_statement(sid, user, sender, ours, quick, {"via": "twiml"})] if quick else []
            statements += [opt] if opt is not None else []
            if not await hub.ingest(PROVIDER, sid, "sms", raw.decode("utf-8"), with_statements=statements):
                pending.pop(sid, None)
                return twiml.response(twiml.EMPTY)  # a retry: the first delivery got its answer
            entry.inline, entry.text, entry.recorded = True, quick, True
            return twiml.response(twiml.sms(quick))
        # The LLM may answer inline: keep processors (this node's and any other node's, which
        # cannot see ``pending``) off the row until the route has decided.
        hold = int((time.time() + hub.settings.llm.sms_budget_s + HOLD_MARGIN_S) * 1000)
        if not await hub.ingest(PROVIDER, sid, "sms", raw.decode("utf-8"), not_before_ms=hold):
            pending.pop(sid, None)
            return twiml.response(twiml.EMPTY)
        if not entry.looked_up:
            hub.release(PROVIDER, sid)
            return twiml.response(twiml.EMPTY)  # reads failing: the processor replies later
        entry.task = task = asyncio.ensure_future(hub.replier.slow_sms(user, body, sid))  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(asyncio.shield(task), hub.settings.llm.sms_budget_s)
        except TimeoutError:
            log.info("SMS %s: reply not ready in %.1f s; it goes out via REST", sid, hub.settings.llm.sms_budget_s)
            hub.release(PROVIDER, sid)
            return twiml.response(twiml.EMPTY)
        text = task.result()
        entry.inline, entry.text = True, text
        # Recorded now (before the release, so other nodes see it) and again with the effects.
        hub.db.submit(*reply_statement(sid, user, sender, ours, text, {"via": "twiml"}))
        hub.release(PROVIDER, sid)
        return twiml.response(twiml.sms(text))
    except web.HTTPException:
        pending.pop(sid, None)
        raise
    finally:
        entry.decided.set()


async def effect(hub: Hub, row: InboxRow) -> Outcome:
    sid = row.event_id
    entry = _pending(hub).get(sid)
    if entry is not None:
        await entry.decided.wait()  # the route is still answering: let it finish first
    form = entry.form if entry is not None else None
    if form is None:
        form = MultiDict(parse_qsl(row.payload, keep_blank_values=True))
    sender, ours, body = form.get("From"), form.get("To"), form.get("Body", "")
    if not sender:
        raise PermanentError("SMS has no From")
    user = entry.user if entry is not None and entry.looked_up else await find_user(hub, sender)
    message = messages.insert_statement(
        channel="sms",
        direction="in",
        provider_id=sid,
        user_id=user.id if user else None,
        from_addr=sender,
        to_addr=ours,
        body=body,
        status="received",
        meta={"num_media": form.get("NumMedia", "0")},
        at_ms=row.received_at,
    )
    statements: list[Statement] = []
    opt = optouts.sms_statement(sender, optouts.keyword(body), row.received_at)
    if opt is not None:
        statements.append(opt)
    inserts = [message]
    quota: list[Statement] = []
    if user is not None:
        increment, ledger = usage.count_statements("sms", f"sms:{sid}", user.id, 1, row.received_at)
        statements.append(increment)
        inserts.append(ledger)  # committed after every increment of the group, merged
        if user.tier in TIERS:
            period = usage.period_of(row.received_at)
            quota = compose.quota_statements(hub.settings, user, TIERS[user.tier], "sms", period)
            statements += quota  # judged on the count just incremented
    statements += await _deferred_reply(hub, sid, user, sender, ours, body)
    who = mask_phone(sender)
    summary = f"SMS from {user.name if user else 'unknown'} ({who}): {len(body)} chars"
    return Outcome(
        statements,
        [MessageReceived("sms", user.id if user else None, summary), received(row, summary, user.id if user else None)],
        inserts=inserts,
        notify=bool(quota),
    )


async def _deferred_reply(
    hub: Hub, sid: str, user: User | None, sender: str, ours: str | None, body: str
) -> list[Statement]:
    """Send the reply through REST when the route could not answer inline."""
    entry = _pending(hub).get(sid)
    if entry is not None:
        await entry.decided.wait()
        if entry.inline:
            _pending(hub).pop(sid, None)
            if entry.recorded:
                return []
            return [reply_statement(sid, user, sender, ours, entry.text, {"via": "twiml"})]
    if entry is not None and entry.task is not None:
        try:
            text = await entry.task
        except Exception:
            _pending(hub).pop(sid, None)  # the next attempt composes afresh
            raise
    else:
        # After a restart or a replay: only reply if no reply was recorded.
        if await hub.read(lambda d: messages.get_by_provider_id(d, f"reply:{sid}")) is not None:
            return []
        text = await hub.replier.sms(user, body, sender, sid)
    keyword = optouts.keyword(body) in optouts.STOP_WORDS | optouts.START_WORDS | optouts.HELP_WORDS
    if not text or (not keyword and await hub.read(lambda d: optouts.sms_opted_out(d, sender))):
        _pending(hub).pop(sid, None)
        return []  # the number texted STOP (perhaps while this reply was composed): nothing goes back
    if not ours:
        raise PermanentError("SMS has no To to reply from")
    assert hub.twilio_rest is not None
    rest_sid = await hub.twilio_rest.send_sms(to=sender, from_=ours, body=text)
    _pending(hub).pop(sid, None)
    return [reply_statement(sid, user, sender, ours, text, {"via": "rest", "sid": rest_sid})]


def _bound(pending: OrderedDict[str, PendingReply]) -> None:
    """Drop the oldest decided entries beyond ``MAX_PENDING`` (undecided ones are still being
    answered by their route). Without its entry the processor falls back to the durable path:
    a reply on record (every inline answer is written before its row can be claimed) is not
    sent again; otherwise the reply is composed afresh and sent through REST."""
    excess = len(pending) - MAX_PENDING
    if excess <= 0:
        return
    for sid in list(islice((s for s, e in pending.items() if e.decided.is_set()), excess)):
        entry = pending.pop(sid)
        if entry.task is not None:
            entry.task.cancel()


def prune(hub: Hub, older_than_s: float) -> None:
    """Forget pending replies nobody will collect (their inbox row died or was lost)."""
    cutoff = time.monotonic() - older_than_s
    pending = _pending(hub)
    for sid in [s for s, e in pending.items() if e.created < cutoff]:
        entry = pending.pop(sid)
        if entry.task is not None:
            entry.task.cancel()
