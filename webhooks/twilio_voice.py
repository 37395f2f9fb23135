"""Voice webhooks: admission of incoming calls, call status callbacks, voicemail, re-routes.

``POST /twilio/voice`` must answer in well under a second (the caller hears silence until
then), so it does one pooled read (user, usage) and one write (``engine.store.routing``: the
node with the most free slots, counting calls routed there that have not connected yet, and
a reservation of one of its slots) and answers: ``<Connect><Stream>`` to the chosen node's
bridge with a one-time token, or a polite ``<Say>`` and a ``<Record>`` voicemail when no node
has room, or a refusal for unknown callers (``telephony.unknown_callers``) and exhausted plans.

``<Connect action="/twilio/voice/reroute?leg=N">``: when the stream of leg N ends while the
caller is still on the line (its node died, shut down or dropped the stream), Twilio asks that
URL what next, and the call is re-routed to another ready node with a short apology, a fresh
token and the same call row (one more leg). A call that ended normally (the caller or an
operator hung up) is not re-routed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from aiohttp import web
from multidict import MultiDict

from engine.config import secret
from engine.events import CallRefused, MessageReceived
from engine.logging_setup import mask_phone
from engine.notify import compose, links
from engine.store import inbox, messages, routing, usage
from engine.store.db import Database, StoreError, log_if_failed
from engine.store.inbox import InboxRow
from engine.store.outbox import Draft, enqueue_statement
from engine.store.users import User, find_by_phone, get_user
from engine.telephony.calltoken import Claims, mint
from engine.tiers import TIERS
from engine.tiers import tier as tier_named
from webhooks import twiml
from webhooks.body import FORM_LIMIT, parse_form, read_body
from webhooks.hub import HUB, Hub, Outcome
from webhooks.processor import PermanentError, received

log = logging.getLogger("xswarm.webhooks.voice")
PROVIDER = "twilio-voice"
VOICEMAIL_PATH = "/twilio/voice/voicemail"
TRANSCRIPTION_PATH = "/twilio/voice/transcription"
REROUTE_PATH = "/twilio/voice/reroute"
MAX_LEGS = 4
"""Streams one call may get (the first and three re-routes) before it goes to voicemail."""
NORMAL_ENDS = ("hung up", "caller hung up")
"""Prefixes of a call row's ``end_reason`` that mean the call ended on purpose."""
TERMINAL = {"completed", "busy", "failed", "no-answer", "canceled"}

REFUSE_UNKNOWN = "Hello. This line only takes calls from registered users. Goodbye."
NO_ROOM = (
    "Hello. All of our lines are busy right now. Please leave a message after the tone, and we will get back to you."
)
NOT_READY = "Hello. The assistant is not available right now. Please leave a message after the tone."
REROUTE_APOLOGY = "Sorry, we lost the line for a moment. Reconnecting you now."


@dataclass(frozen=True)
class Admission:
    user: User | None
    minutes_used: float


def _admission(db: Database, caller: str | None) -> Admission:
    """Everything the refusal rules depend on, in one trip to the reader pool."""
    user = find_by_phone(db, caller) if caller else None
    used = usage.usage_for(db, user.id).voice_minutes if user else 0.0
    return Admission(user, used)


async def _verified_form(hub: Hub, request: web.Request) -> tuple[bytes, MultiDict[str]]:
    raw = await read_body(request, FORM_LIMIT)
    form = parse_form(request, raw)
    hub.twilio.check(request, form)
    return raw, form


def _call_sid(form: MultiDict[str]) -> str:
    """The form's CallSid; 400 when missing (nothing can be keyed without it)."""
    call_sid = form.get("CallSid")
    if not call_sid:
        raise web.HTTPBadRequest(text="no CallSid")
    return call_sid


async def voice(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    raw, form = await _verified_form(hub, request)
    call_sid = _call_sid(form)
    if not await hub.ingest(PROVIDER, call_sid, "call", raw.decode("utf-8")) and await _replayed(hub, call_sid):
        hub.bus.publish(CallRefused("replayed call webhook", call_sid))
        return twiml.response(twiml.hang_up())
    # A retried webhook for the same call is answered the same way (fresh token, same rules).
    caller = form.get("From")
    admission = await hub.read(lambda d: _admission(d, caller))
    refusal = refuse(hub, caller, admission)
    if refusal is not None:
        return twiml.response(refusal)
    return twiml.response(await connect(hub, call_sid, caller, admission.user, leg=1))


async def _replayed(hub: Hub, call_sid: str) -> bool:
    """A second POST for a call first seen longer ago than a call token lives. Twilio retries
    (its fallback to this URL) within seconds and get a stream again; a captured signed
    request replayed later must not mint one valid token after another."""
    first = await hub.read(lambda d: inbox.get(d, f"{PROVIDER}:{call_sid}"))
    ttl_ms = hub.settings.telephony.call_token_ttl_s * 1000
    return first is not None and inbox.now_ms() - first.received_at > ttl_ms


def refuse(hub: Hub, caller: str | None, admission: Admission) -> str | None:
    """The answer for a caller this line does not take now, or None to connect the call."""
    user, telephony = admission.user, hub.settings.telephony
    if user is None and telephony.unknown_callers == "refuse":
        hub.bus.publish(CallRefused("unknown caller", mask_phone(caller)))
        return twiml.say_and_hang_up(REFUSE_UNKNOWN)
    if user is not None:
        try:
            limit = tier_named(user.tier).voice_minutes
        except ValueError:
            limit = 0
        if limit is not None and admission.minutes_used >= limit:
            hub.bus.publish(CallRefused("voice minutes used up", f"{user.id} on {user.tier}"))
            return twiml.say_and_hang_up(
                f"Hello {user.name}. You have used all {limit} voice minutes of your plan this month. "
                "You can still send a text. Goodbye."
            )
    return None


async def connect(
    hub: Hub,
    call_sid: str,
    caller: str | None,
    user: User | None,
    *,
    leg: int,
    exclude: tuple[str, ...] = (),
    apology: str | None = None,
) -> str:
    """Route leg ``leg`` of the call to a node (not one in ``exclude``) and stream it there;
    voicemail when no node has room or tokens cannot be minted."""
    telephony = hub.settings.telephony
    token_secret = secret(telephony.call_token_secret)
    if not token_secret:
        log.error("XSWARM_CALL_TOKEN_SECRET is not set: calls cannot be admitted, taking voicemail")
        hub.bus.publish(CallRefused("no call token secret", "XSWARM_CALL_TOKEN_SECRET unset"))
        return _take_voicemail(hub, NOT_READY)
    try:
        assert hub.session is not None  # opened with the server
        route = await routing.reserve(
            hub.db, call_sid, ttl_s=telephony.call_token_ttl_s, session=hub.session, exclude=exclude
        )
    except StoreError as exc:
        log.error("routing %s failed (taking voicemail): %s", call_sid, exc)
        route = None
    if route is None:
        hub.bus.publish(CallRefused("no free slot", mask_phone(caller)))
        return _take_voicemail(hub, NO_ROOM)
    theme = user.theme if user else hub.settings.ui.theme
    claims = Claims(user.id if user else None, caller, theme)  # the bridge trusts these, not the parameters
    token = mint(token_secret, call_sid, telephony.call_token_ttl_s, claims=claims)
    return twiml.stream(
        route.bridge_url.rstrip("/") + "/twilio",
        {"token": token, "user_id": user.id if user else "guest", "theme": theme},
        status_action=f"{REROUTE_PATH}?leg={leg}",
        say=apology,
    )


@dataclass(frozen=True)
class LastLeg:
    """Where the call's last stream went and how it ended, as far as the database knows."""

    node_id: str | None
    status: str | None
    end_reason: str | None

    @property
    def ended_normally(self) -> bool:
        return self.status == "ended" and (self.end_reason or "").startswith(NORMAL_ENDS)


def _last_leg(db: Database, call_sid: str) -> tuple[LastLeg, User | None]:
    rows = db.query("SELECT node_id, status, end_reason, caller FROM calls WHERE id = ?", (call_sid,))
    node_id, status_, reason, caller = rows[0] if rows else (None, None, None, None)
    # A call whose node died before the stream started has no row yet: its reservation says where it went.
    node_id = node_id or routing.reserved_node(db, call_sid)
    user = find_by_phone(db, caller) if caller else None
    return LastLeg(node_id, status_, reason), user


async def reroute(request: web.Request) -> web.Response:
    """Twilio's ``<Connect action>`` callback: the stream of leg ``leg`` has ended."""
    hub: Hub = request.app[HUB]
    raw, form = await _verified_form(hub, request)
    call_sid = _call_sid(form)
    leg_text = request.query.get("leg", "")
    if not (leg_text.isascii() and leg_text.isdigit()) or not 1 <= int(leg_text) <= MAX_LEGS:
        raise web.HTTPBadRequest(text="leg must be a number from 1 to 4")
    leg = int(leg_text)
    if form.get("CallStatus") in TERMINAL:
        return twiml.response(twiml.EMPTY)  # the caller is gone: nothing to re-route
    last, user = await hub.read(lambda d: _last_leg(d, call_sid))
    if last.ended_normally:
        return twiml.response(twiml.hang_up())
    caller = form.get("From")
    if user is None and caller:
        user = await hub.read(lambda d: find_by_phone(d, caller))
    if last.node_id is not None and last.status != "ended":
        # The node never wrote the end of this leg: it is probably dead. Route nothing more
        # there until a heartbeat newer than this says otherwise.
        routing.mark_suspect(hub.db, last.node_id).add_done_callback(log_if_failed("suspect mark", log))
    extra = urlencode({"XswarmLeg": leg + 1, "XswarmFromNode": last.node_id or ""})
    await hub.ingest(PROVIDER, f"{call_sid}:leg:{leg + 1}", "reroute", f"{raw.decode('utf-8')}&{extra}")
    if leg >= MAX_LEGS:
        hub.bus.publish(CallRefused("too many re-routes", f"{call_sid} after {leg} legs"))
        return twiml.response(_take_voicemail(hub, NOT_READY))
    exclude = (last.node_id,) if last.node_id else ()
    return twiml.response(
        await connect(hub, call_sid, caller, user, leg=leg + 1, exclude=exclude, apology=REROUTE_APOLOGY)
    )


def _take_voicemail(hub: Hub, apology: str) -> str:
    transcribe = hub.settings.notify.voicemail_transcript_wait_s > 0
    return twiml.voicemail(apology, VOICEMAIL_PATH, transcribe_callback=TRANSCRIPTION_PATH if transcribe else None)


async def status(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    raw, form = await _verified_form(hub, request)
    call_sid, state = form.get("CallSid"), form.get("CallStatus")
    if not call_sid or not state:
        raise web.HTTPBadRequest(text="no CallSid or CallStatus")
    event_id = f"{call_sid}:{state}:{form.get('SequenceNumber', '')}"
    await hub.ingest(PROVIDER, event_id, "status", raw.decode("utf-8"))
    return web.Response(status=204)


async def voicemail(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    raw, form = await _verified_form(hub, request)
    call_sid = _call_sid(form)
    if form.get("RecordingUrl"):
        await hub.ingest(PROVIDER, f"{call_sid}:voicemail", "voicemail", raw.decode("utf-8"))
    return twiml.response(twiml.say_and_hang_up("Thank you. Your message has been saved. Goodbye."))


async def transcription(request: web.Request) -> web.Response:
    """Twilio's ``transcribeCallback``: the voicemail's transcript (or that there is none)."""
    hub: Hub = request.app[HUB]
    raw, form = await _verified_form(hub, request)
    recording = form.get("RecordingSid")
    if not recording:
        raise web.HTTPBadRequest(text="no RecordingSid")
    await hub.ingest(PROVIDER, f"{recording}:transcription", "transcription", raw.decode("utf-8"))
    return web.Response(status=204)


# ----------------------------------------------------------------------------- effects


async def effect(hub: Hub, row: InboxRow) -> Outcome:
    form = dict(parse_qsl(row.payload, keep_blank_values=True))
    if row.event_type == "call":
        caller = form.get("From")
        user = await hub.read(lambda d: find_by_phone(d, caller)) if caller else None
        summary = f"Incoming call from {user.name if user else 'unknown'} ({mask_phone(caller)})"
        return Outcome([], [received(row, summary, user.id if user else None)])
    if row.event_type == "status":
        return await _status_effect(hub, row, form)
    if row.event_type == "voicemail":
        return await _voicemail_effect(hub, row, form)
    if row.event_type == "transcription":
        return await _transcription_effect(hub, row, form)
    if row.event_type == "reroute":
        return _reroute_effect(row, form)
    raise PermanentError(f"unknown voice event type {row.event_type!r}")


async def _status_effect(hub: Hub, row: InboxRow, form: dict[str, str]) -> Outcome:
    call_sid, state, caller = form["CallSid"], form.get("CallStatus", ""), form.get("From")
    terminal = state in TERMINAL
    user_id = await hub.read(lambda d: usage.call_user(d, call_sid))
    if user_id is None and caller:
        user = await hub.read(lambda d: find_by_phone(d, caller))
        user_id = user.id if user else None
    duration = _float(form.get("CallDuration")) if terminal else None
    statements = []
    quota = []
    if terminal:
        statements.append(
            usage.call_status_statement(
                call_sid,
                status=state,
                user_id=user_id,
                caller=caller,
                at_ms=row.received_at,
                duration_s=duration,
                end_reason=state,
            )
        )
        if user_id and duration:
            statements += usage.count_statements("voice", f"call:{call_sid}", user_id, duration, row.received_at)
            counted = await hub.read(lambda d: get_user(d, user_id))
            if counted is not None and counted.tier in TIERS:
                period = usage.period_of(row.received_at)
                quota = compose.quota_statements(hub.settings, counted, TIERS[counted.tier], "voice", period)
                statements += quota  # judged on the seconds just counted
        statements.append(routing.release_statement(call_sid))  # it may have ended before reaching a node
    else:
        statements.append(
            (
                "UPDATE calls SET status = ? WHERE id = ? AND status != 'ended'",
                ("live" if state == "in-progress" else state, call_sid),
            )
        )
    summary = f"Call {mask_phone(caller)} {state}" + (f" after {duration:.0f} s" if duration else "")
    return Outcome(statements, [received(row, summary, user_id)], notify=bool(quota))


def _reroute_effect(row: InboxRow, form: dict[str, str]) -> Outcome:
    """The same call row gets one more leg (inserted when the first leg never went live)."""
    call_sid, caller = form["CallSid"], form.get("From")
    leg = int(form.get("XswarmLeg") or 2)
    statement = (
        "INSERT INTO calls (id, caller, status, started_at, legs) VALUES (?, ?, 'ringing', ?, ?)"
        " ON CONFLICT(id) DO UPDATE SET legs = MAX(calls.legs, excluded.legs)",
        (call_sid, caller, row.received_at, leg),
    )
    summary = (
        f"Call {mask_phone(caller)} re-routed (leg {leg}) after node {form.get('XswarmFromNode') or '?'} dropped it"
    )
    return Outcome([statement], [received(row, summary)])


async def _voicemail_effect(hub: Hub, row: InboxRow, form: dict[str, str]) -> Outcome:
    caller = form.get("From")
    user = await hub.read(lambda d: find_by_phone(d, caller)) if caller else None
    seconds = _float(form.get("RecordingDuration"))
    statement = messages.insert_statement(
        channel="voicemail",
        direction="in",
        provider_id=form.get("RecordingSid") or row.event_id,
        user_id=user.id if user else None,
        from_addr=caller,
        to_addr=form.get("To"),
        body=None,
        status="received",
        meta={
            "recording_url": form.get("RecordingUrl", ""),
            "duration_s": str(seconds or 0),
            "call_sid": form.get("CallSid", ""),
        },
        at_ms=row.received_at,
    )
    # Twilio transcribes it when asked (``_take_voicemail``): the notice waits for the transcript.
    wait_s = hub.settings.notify.voicemail_transcript_wait_s
    hold = row.received_at + int(wait_s * 1000) if wait_s > 0 and not form.get("TranscriptionText") else None
    notices = [enqueue_statement(d, not_before_ms=hold) for d in _voicemail_notices(hub, form, user, seconds)]
    summary = f"Voicemail from {user.name if user else 'unknown'} ({mask_phone(caller)}), {seconds or 0:.0f} s"
    return Outcome(
        [statement, *notices],
        [
            MessageReceived("voicemail", user.id if user else None, summary),
            received(row, summary, user.id if user else None),
        ],
        notify=bool(notices),
    )


async def _transcription_effect(hub: Hub, row: InboxRow, form: dict[str, str]) -> Outcome:
    """The transcript joins the voicemail's message row and its waiting notice, which goes out
    now (a notice already sent stays as it was). Twilio's failures (too short, not English)
    come as ``TranscriptionStatus=failed``: the notice then goes out without one."""
    recording, caller = form["RecordingSid"], form.get("From")
    text = (form.get("TranscriptionText") or "").strip() if form.get("TranscriptionStatus") == "completed" else ""
    user = await hub.read(lambda d: find_by_phone(d, caller)) if caller else None
    stored = await hub.read(lambda d: messages.get_by_provider_id(d, recording))
    seconds = _float(str(stored.meta.get("duration_s"))) if stored is not None else None
    fields = dict(form, TranscriptionText=text)
    notices = [enqueue_statement(d, revise=True) for d in _voicemail_notices(hub, fields, user, seconds)]
    statements = [*notices]
    if text:
        statements.append(messages.body_statement(recording, text))
    summary = f"Voicemail {recording} transcript: {'received' if text else form.get('TranscriptionStatus', 'none')}"
    return Outcome(statements, [received(row, summary, user.id if user else None)], notify=bool(notices))


def _voicemail_notices(hub: Hub, form: dict[str, str], user: User | None, seconds: float | None) -> list[Draft]:
    """Tell someone: the caller when they are a user (a receipt with the transcript or a
    notice, and a link to listen), otherwise the operator at ``notify.operator_email``."""
    settings = hub.settings
    recording = form.get("RecordingSid") or f"{form.get('CallSid', '')}-recording"
    caller: str | None = None  # the recipient left it
    if user is not None:
        to = compose.Recipient.of(user)
    elif settings.notify.operator_email:
        to = compose.Recipient(None, "operator", None, settings.notify.operator_email)
        caller = form.get("From") or "an unknown caller"
    else:
        log.info("voicemail %s from an unknown caller: no notify.operator_email to tell", recording)
        return []
    listen = links.listen_url(settings, recording) if form.get("RecordingSid") else None
    if listen is None and form.get("RecordingUrl"):
        listen = form["RecordingUrl"] + ".mp3"  # Twilio's own URL (may ask for the account's credentials)
    return compose.voicemail(
        settings,
        to,
        recording_sid=recording,
        caller=caller,
        seconds=seconds,
        transcript=form.get("TranscriptionText") or None,
        listen=listen,
    )


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None
