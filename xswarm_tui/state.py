"""What the console knows: runtime events folded into plain Python state.

Why a separate fold: events arrive on other threads at up to 12.5 Hz per call, but the screen
redraws at most 4 Hz. The app drains a queue of events into this ``ConsoleState`` (cheap, no
widgets touched) and then asks the widgets to show the result. The same fold serves the
embedded bus and the attached socket, and tests can check it without a terminal.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine import events as ev
from engine.snapshot import read_snapshot

HISTORY = 120
"""Samples kept per sparkline: 30 s at 4 Hz."""
FEED_SIZE = 500
"""Events kept in the feed and the log mirror."""
HEADROOM_HOLD_S = 30.0
"""How long a "no headroom" verdict is shown without fresh word. The node only says so when
asked (a snapshot, a refused call); with no callers there is no news either way, so an old
verdict is dropped rather than shown as current."""
NO_HEADROOM = "no_headroom"
"""``CallRefused.reason`` when admission refused a call because the model is slower than real time."""


@dataclass
class CallView:
    """One live call as the console shows it."""

    call_id: str
    slot: int
    source: str
    caller: str | None
    user_id: str | None
    theme: str | None
    started_at: float
    mode: str = "ai"
    operator: str | None = None
    listeners: int = 0
    late_frames: int = 0
    in_level: float = 0.0
    out_level: float = 0.0
    step_ms: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    bal_ms: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    lag_ms: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    transcript: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=400))
    """(speaker, text) pieces in arrival order."""
    dtmf: str = ""
    actions: deque[str] = field(default_factory=lambda: deque(maxlen=50))

    @property
    def bal_p50(self) -> float | None:
        return statistics.median(self.bal_ms) if self.bal_ms else None

    @property
    def lag(self) -> float | None:
        return self.lag_ms[-1] if self.lag_ms else None


@dataclass(frozen=True)
class Snapshot:
    """A runtime snapshot in the event queue, with the time before which it is complete."""

    data: dict[str, Any]
    taken_after: float | None


@dataclass(frozen=True)
class FeedItem:
    """One line of the events feed."""

    seq: int
    at: float
    category: str
    """sms, email, payment, user, webhook, call, supervisor, model, node or error: what `/` filters on."""
    text: str


def mask_caller(number: str | None) -> str:
    """``+1 555 0100 123`` → ``+1•••••••123``: enough to tell callers apart, not to dial them."""
    if not number:
        return "—"
    if len(number) <= 4:
        return "•" * len(number)
    head = 2 if number.startswith("+") else 0
    return number[:head] + "•" * (len(number) - head - 3) + number[-3:]


@dataclass(frozen=True)
class StateChanged:
    """Published on the app's ``state_changed`` signal at each redraw: which parts of the
    state have news, and which calls changed or went. Each panel subscribes and redraws its
    own part; ``CLOCK`` alone means a second passed (durations, staleness)."""

    parts: frozenset[str]
    """Among "calls", "system", "feed", "model" and ``CLOCK``."""
    calls: frozenset[str] = frozenset()


CLOCK = "clock"


class ConsoleState:
    """Everything on screen, rebuilt from events; single-threaded (the UI thread owns it)."""

    def __init__(self) -> None:
        self.calls: dict[str, CallView] = {}
        self.system: ev.SystemSampled | None = None
        self.tick: ev.TickSampled | None = None
        self.tick_history: deque[float] = deque(maxlen=HISTORY)
        self.model: ev.ModelStatusChanged | None = None
        self.feed: deque[FeedItem] = deque(maxlen=FEED_SIZE)
        self.ended: int = 0
        self.no_headroom: str | None = None
        """The node's reason for refusing calls for lack of headroom (None: admitting)."""
        self.no_headroom_at: float = 0.0
        self._seq = 0
        self.changed_calls: set[str] = set()
        """Calls whose row needs redrawing since the widgets last looked."""
        self.removed_calls: set[str] = set()
        self.dirty: set[str] = set()
        """Panels with news: "calls", "system", "feed", "model"."""
        self.node: dict[str, Any] = {}
        """The node's id and ports from its snapshot (the empty board's test-call commands)."""
        self.me: str | None = None
        """This console's operator name, to notice actions others take on calls it holds."""
        self._ended_holders: dict[str, str] = {}
        self.notices: list[str] = []
        """Things this operator must be told at once (another operator hung up a call it held);
        the app shows and clears them."""

    # ---------------------------------------------------------------------------------------
    def load_snapshot(self, snap: dict[str, Any], *, taken_after: float | None = None) -> None:
        """Seed live calls and model state from ``Runtime.snapshot()`` (or the socket's).

        Idempotent. A call the snapshot does not list is dropped only if it started before
        ``taken_after`` (it ended while we were not looking); one that started later is newer
        than the snapshot and stays. A snapshot without a "calls" list (an incomplete one)
        drops nothing. Calls still live keep their histories."""
        typed = read_snapshot(snap)
        listed = typed.calls or []
        if typed.calls is not None and taken_after is not None:
            live = {c.call_id for c in listed}
            for call_id in [cid for cid, c in self.calls.items() if cid not in live and c.started_at < taken_after]:
                del self.calls[call_id]
                self.removed_calls.add(call_id)
                self.dirty.add("calls")
        for call in listed:
            if call.call_id not in self.calls:
                self.apply(
                    ev.CallStarted(
                        call_id=call.call_id,
                        slot=call.slot,
                        source=call.source,
                        caller=call.caller,
                        user_id=call.user_id,
                        theme=call.theme,
                        at=call.started_at,
                    )
                )
            if call.mode is not None:
                self.apply(
                    ev.CallUpdated(
                        call_id=call.call_id, mode=call.mode, operator=call.operator, listeners=call.listeners
                    )
                )
        if isinstance(snap.get("node"), dict):
            self.node = dict(snap["node"])
            self.dirty.add("calls")
        if typed.slots is not None and "no_headroom" in snap["slots"]:  # a fleet's merged slots leave it out
            server_time = snap.get("server_time")
            at = float(server_time) if isinstance(server_time, (int, float)) else time.time()
            self._set_headroom(typed.slots.no_headroom, at)
        model = typed.model
        if model is not None and model.state != "idle":
            self.apply(
                ev.ModelStatusChanged(
                    model=model.name or model.spec, state=model.state, detail=model.detail, progress=model.progress
                )
            )
        if self.feed:  # a reconnect: the feed already holds these
            return
        for wire in typed.recent_events:
            try:
                event = ev.from_wire(wire)
            except ev.WireError:
                continue
            if isinstance(event, _FEED_ONLY):
                self.apply(event)

    def admission_paused(self, now: float) -> str | None:
        """Why new calls are being refused for lack of headroom, while that is recent news."""
        if self.no_headroom is None or now - self.no_headroom_at > HEADROOM_HOLD_S:
            return None
        return self.no_headroom

    def _set_headroom(self, reason: str | None, at: float) -> None:
        if at < self.no_headroom_at:
            return  # older news than what we hold
        self.no_headroom, self.no_headroom_at = reason, at
        self.dirty.add("system")

    def _refused(self, e: ev.CallRefused) -> None:
        if e.reason == NO_HEADROOM:
            self._set_headroom(e.detail or "model has no headroom", e.at)
        self._feed(e.at, "call", f"call refused: {e.reason} {e.detail}".rstrip())

    def apply(self, event: ev.Event) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    # ------------------------------------------------------------------------ handlers
    def _started(self, e: ev.CallStarted) -> None:
        self.calls[e.call_id] = CallView(e.call_id, e.slot, e.source, e.caller, e.user_id, e.theme, e.at)
        self.removed_calls.discard(e.call_id)
        self._touch(e.call_id)
        if self.no_headroom is not None:
            self._set_headroom(None, e.at)  # a call was admitted: there is headroom again
        who = "local microphone" if e.source == "local" else mask_caller(e.caller)
        self._feed(e.at, "call", f"call {e.call_id} started ({who}, slot {e.slot})")

    def _updated(self, e: ev.CallUpdated) -> None:
        call = self.calls.get(e.call_id)
        if call is None:
            return
        call.mode, call.operator, call.listeners = e.mode, e.operator, e.listeners
        self._touch(e.call_id)

    def _ended(self, e: ev.CallEnded) -> None:
        call = self.calls.pop(e.call_id, None)
        if call is not None and call.operator is not None:
            # A hang-up is reported after the call has ended: remember who held it, briefly.
            self._ended_holders[e.call_id] = call.operator
            while len(self._ended_holders) > 64:
                del self._ended_holders[next(iter(self._ended_holders))]
        if call is not None:
            self.removed_calls.add(e.call_id)
            self.changed_calls.discard(e.call_id)
            self.dirty.update(("calls", "system"))  # the batch figure counts live calls
        self.ended += 1
        self._feed(e.at, "call", f"call {e.call_id} ended: {e.reason} after {e.duration_s:.0f} s")

    def _latency(self, e: ev.LatencySampled) -> None:
        call = self.calls.get(e.call_id)
        if call is None:
            return
        call.step_ms.append(e.step_ms)
        if e.bal_ms is not None:
            call.bal_ms.append(e.bal_ms)
        if e.playout_lag_ms is not None:
            call.lag_ms.append(e.playout_lag_ms)
        call.late_frames, call.in_level, call.out_level = e.late_frames, e.in_level, e.out_level
        self._touch(e.call_id)

    def _tick(self, e: ev.TickSampled) -> None:
        self.tick = e
        self.tick_history.append(e.step_ms_p50)
        self.dirty.add("system")

    def _transcript(self, e: ev.TranscriptAppended) -> None:
        call = self.calls.get(e.call_id)
        if call is not None:
            call.transcript.append((e.speaker, e.text))
            self._touch(e.call_id)

    def _dtmf(self, e: ev.DtmfReceived) -> None:
        call = self.calls.get(e.call_id)
        if call is not None:
            call.dtmf = (call.dtmf + e.digit)[-32:]
            self._touch(e.call_id)
        self._feed(e.at, "call", f"DTMF {e.digit} on {e.call_id}")

    def _system(self, e: ev.SystemSampled) -> None:
        self.system = e
        self.dirty.add("system")

    def _model(self, e: ev.ModelStatusChanged) -> None:
        previous = self.model
        self.model = e
        if previous is not None and (previous.model, previous.state, previous.detail) == (e.model, e.state, e.detail):
            self.dirty.add("model")
            return  # the same news again (a snapshot after the live event, a reconnect): one feed line
        self.dirty.update(("model", "system"))
        if e.progress is None or e.state != "loading":  # progress ticks would flood the feed
            detail = f": {e.detail}" if e.detail else ""
            self._feed(e.at, "model" if e.state != "failed" else "error", f"model {e.model} {e.state}{detail}")

    def _acted(self, e: ev.SupervisorActed) -> None:
        call = self.calls.get(e.call_id or "")
        line = f"{e.actor}: {e.action} → {e.result}"
        holder = call.operator if call is not None else self._ended_holders.get(e.call_id or "")
        if (
            self.me is not None
            and holder == self.me
            and e.actor != self.me
            and e.result == "ok"
            and e.action in ("hangup", "transfer", "mute")
        ):
            did = {"hangup": "hung up", "transfer": "transferred", "mute": "muted the AI on"}[e.action]
            self.notices.append(f"{e.actor} {did} call {e.call_id}, which you held")
        if call is not None:
            call.actions.append(line)
            self._touch(call.call_id)
        self._feed(e.at, "supervisor", f"{line}" + (f" ({e.call_id})" if e.call_id else ""))

    def _touch(self, call_id: str) -> None:
        self.changed_calls.add(call_id)
        self.dirty.add("calls")

    def _feed(self, at: float, category: str, text: str) -> None:
        self._seq += 1
        self.feed.append(FeedItem(self._seq, at, category, text))
        self.dirty.add("feed")


def _message(s: ConsoleState, e: ev.MessageReceived) -> None:
    s._feed(
        e.at,
        e.channel if e.channel != "voicemail" else "sms",
        f"{e.channel} from {e.user_id or 'unknown'}: {e.summary}",
    )


def _payment(s: ConsoleState, e: ev.PaymentStatusChanged) -> None:
    tier = f" (tier {e.tier})" if e.tier else ""
    s._feed(e.at, "payment", f"payment {e.status} for {e.user_id or 'unknown'}{tier}")


_FEED_ONLY = (
    ev.MessageReceived,
    ev.PaymentStatusChanged,
    ev.WebhookReceived,
    ev.WebhookFailed,
    ev.UserCreated,
    ev.ErrorRaised,
    ev.CallRefused,
    ev.SupervisorActed,
    ev.NodeStateChanged,
)
"""Recent events a snapshot may replay into the feed (call events are the snapshot's own calls)."""

_HANDLERS: dict[type, Any] = {
    ev.CallStarted: ConsoleState._started,
    ev.CallUpdated: ConsoleState._updated,
    ev.CallEnded: ConsoleState._ended,
    ev.LatencySampled: ConsoleState._latency,
    ev.TickSampled: ConsoleState._tick,
    ev.TranscriptAppended: ConsoleState._transcript,
    ev.DtmfReceived: ConsoleState._dtmf,
    ev.SystemSampled: ConsoleState._system,
    ev.ModelStatusChanged: ConsoleState._model,
    ev.SupervisorActed: ConsoleState._acted,
    ev.MessageReceived: _message,
    ev.PaymentStatusChanged: _payment,
    ev.CallRefused: ConsoleState._refused,
    ev.WebhookReceived: lambda s, e: s._feed(e.at, "webhook", f"{e.provider} {e.event_type}: {e.summary}"),
    ev.WebhookFailed: lambda s, e: s._feed(
        e.at, "error", f"{e.provider} webhook {e.event_id} {'dead-lettered' if e.dead else 'failed'}: {e.error}"
    ),
    ev.UserCreated: lambda s, e: s._feed(e.at, "user", f"new user {e.name} ({e.tier})"),
    ev.ErrorRaised: lambda s, e: s._feed(e.at, "error", f"{e.source}: {e.message}"),
    ev.NodeStateChanged: lambda s, e: s._feed(
        e.at,
        "node" if e.state != "down" else "error",
        f"node {e.node_id} {e.state}" + (f": {e.detail}" if e.detail else ""),
    ),
}
