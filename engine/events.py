"""Runtime events (facts, past tense) and supervisor commands (imperative), and the bus.

These dataclasses are the one vocabulary of xswarm: the runtime publishes events on the
``EventBus``; the TUI, the supervisor server, metrics and the store subscribe. The supervisor
protocol carries the very same types as JSON (``to_wire``/``from_wire``), so the embedded TUI
and ``xswarm attach`` share one code path.

Adding a type: subclass ``Event`` or ``Command`` with ``@message`` and plain JSON-able fields;
a ``Command`` also names its ``action`` (the word audit_log and ``SupervisorActed`` use).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, dataclass_transform

PROTOCOL_VERSION = 1
_log = logging.getLogger("xswarm.bus")

_REGISTRY: dict[str, type[Wire]] = {}
W = TypeVar("W", bound="Wire")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def message(cls: type[W]) -> type[W]:
    """Make ``cls`` a frozen, slotted dataclass and register it under its class name so
    ``from_wire`` can rebuild it. ``dataclass_transform`` tells type checkers what it does."""
    made = dataclass(frozen=True, slots=True)(cls)  # slots=True returns a new class
    if made.kind == "command" and not isinstance(getattr(made, "action", None), str):
        raise TypeError(f"{made.__name__}: a Command names its action (action: ClassVar[str] = ...)")
    _REGISTRY[made.__name__] = made
    return made


def wire_types(base: type[W]) -> list[type[W]]:
    """Every registered event or command type that is a ``base``."""
    return [cls for cls in _REGISTRY.values() if issubclass(cls, base)]


class Wire:
    """Common JSON form: ``{"v": 1, "type": "<ClassName>", …fields}``."""

    kind: ClassVar[str] = "wire"
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    """Declared for type checkers: every registered subclass is a dataclass (``@message``)."""

    def to_wire(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["v"] = PROTOCOL_VERSION
        data["type"] = type(self).__name__
        return data


class WireError(ValueError):
    """A message that is not a known, well-formed v1 event or command."""


def from_wire(data: Any) -> Wire:
    """Rebuild an event or command from its JSON form, checking type and field names."""
    if not isinstance(data, dict):
        raise WireError("message must be a JSON object")
    if data.get("v") != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {data.get('v')!r}")
    cls = _REGISTRY.get(str(data.get("type")))
    if cls is None:
        raise WireError(f"unknown message type {data.get('type')!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    body = {k: v for k, v in data.items() if k not in ("v", "type", "id")}
    unknown = set(body) - names
    if unknown:
        raise WireError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    missing = required - set(body)
    if missing:
        raise WireError(f"{cls.__name__}: missing fields {sorted(missing)}")
    try:
        return cls(**body)
    except TypeError as exc:
        raise WireError(f"{cls.__name__}: {exc}") from None


def now() -> float:
    """Wall-clock seconds; every event carries one so late subscribers can order them."""
    return time.time()


# ---------------------------------------------------------------------------------- events


class Event(Wire):
    kind: ClassVar[str] = "event"


ModelLoad = Literal["loading", "warming", "ready", "failed", "fallback"]
"""Where loading the model stands."""
Mode = Literal["ai", "operator", "muted"]
"""Who the caller hears: the AI, an operator who took the call over, or nobody (muted)."""


@message
class CallStarted(Event):
    call_id: str
    slot: int
    source: str
    """"twilio" or "local"."""
    caller: str | None = None
    user_id: str | None = None
    theme: str | None = None
    at: float = field(default_factory=now)


@message
class CallUpdated(Event):
    call_id: str
    mode: Mode
    operator: str | None = None
    """Who holds the takeover, if anyone."""
    listeners: int = 0
    at: float = field(default_factory=now)


@message
class CallEnded(Event):
    call_id: str
    reason: str
    duration_s: float
    at: float = field(default_factory=now)


@message
class LatencySampled(Event):
    """Per-call figures, coalesced to at most 4 Hz per call before they leave the runtime."""

    call_id: str
    step_ms: float
    bal_ms: float | None = None
    playout_lag_ms: float | None = None
    late_frames: int = 0
    in_level: float = 0.0
    out_level: float = 0.0
    at: float = field(default_factory=now)


@message
class TickSampled(Event):
    """Scheduler-wide figures for one window of ticks."""

    step_ms_p50: float
    """The batched model step alone."""
    step_ms_max: float
    active: int
    slots: int
    missed_ticks: int
    at: float = field(default_factory=now)
    tick_work_ms_p50: float | None = None
    """The tick's whole work (gathering frames, hand-off, resampling, model step): what must fit in 80 ms."""
    tick_work_ms_max: float | None = None


@message
class TranscriptAppended(Event):
    call_id: str
    text: str
    speaker: Literal["ai", "operator", "caller"] = "ai"
    at: float = field(default_factory=now)


@message
class DtmfReceived(Event):
    call_id: str
    digit: str
    at: float = field(default_factory=now)


@message
class CallRefused(Event):
    reason: str
    detail: str = ""
    at: float = field(default_factory=now)


@message
class WebhookReceived(Event):
    provider: str
    event_type: str
    summary: str
    user_id: str | None = None
    at: float = field(default_factory=now)


@message
class WebhookFailed(Event):
    provider: str
    event_id: str
    error: str
    dead: bool = False
    at: float = field(default_factory=now)


@message
class MessageReceived(Event):
    channel: Literal["sms", "email", "voicemail"]
    user_id: str | None
    summary: str
    at: float = field(default_factory=now)


@message
class PaymentStatusChanged(Event):
    user_id: str | None
    status: str
    tier: str | None = None
    at: float = field(default_factory=now)


@message
class UserCreated(Event):
    user_id: str
    name: str
    tier: str
    at: float = field(default_factory=now)


@message
class SupervisorActed(Event):
    actor: str
    action: str
    call_id: str | None
    result: str
    at: float = field(default_factory=now)


@message
class ModelStatusChanged(Event):
    model: str
    state: ModelLoad
    detail: str = ""
    progress: float | None = None
    at: float = field(default_factory=now)


@message
class NodeStateChanged(Event):
    """A node of the fleet took up a state: ``draining`` (``xswarm nodes drain``: no new
    calls, live calls finish), ``ready`` again, or ``down`` (seen by a console that lost it)."""

    node_id: str
    state: Literal["ready", "draining", "down"]
    detail: str = ""
    at: float = field(default_factory=now)


@message
class SystemSampled(Event):
    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int
    gpus: list[dict[str, Any]] = field(default_factory=list)
    """One dict per GPU: name, util_percent, mem_used, mem_total, temp_c, power_w."""
    at: float = field(default_factory=now)
    gpu_reason: str | None = None
    """Why ``gpus`` is empty (no driver, no device), in words; None when GPUs were found."""


@message
class ErrorRaised(Event):
    source: str
    message: str
    at: float = field(default_factory=now)


# -------------------------------------------------------------------------------- commands


class Command(Wire):
    kind: ClassVar[str] = "command"
    action: ClassVar[str]
    """The action's name in audit_log, ``SupervisorActed`` and the docs."""


@message
class Listen(Command):
    action: ClassVar[str] = "listen"
    call_id: str


@message
class Unlisten(Command):
    action: ClassVar[str] = "unlisten"
    call_id: str


@message
class Whisper(Command):
    action: ClassVar[str] = "whisper"
    call_id: str
    text: str


@message
class Mute(Command):
    action: ClassVar[str] = "mute"
    call_id: str


@message
class Unmute(Command):
    action: ClassVar[str] = "unmute"
    call_id: str


@message
class TakeOver(Command):
    action: ClassVar[str] = "takeover"
    call_id: str


@message
class HandBack(Command):
    action: ClassVar[str] = "handback"
    call_id: str


@message
class HangUp(Command):
    action: ClassVar[str] = "hangup"
    call_id: str


@message
class Transfer(Command):
    action: ClassVar[str] = "transfer"
    call_id: str
    to: str | None = None
    """E.164 number to dial; None dials the node's ``twilio.transfer_number``."""


@message
class StartLocalCall(Command):
    """Talk to the AI through this machine's microphone and speakers (one more slot)."""

    action: ClassVar[str] = "start_local_call"


@message
class DrainNode(Command):
    """Take the node this command is sent to out of rotation (as ``xswarm nodes drain``)."""

    action: ClassVar[str] = "drain"


@message
class ResumeNode(Command):
    """Put the node this command is sent to back into rotation."""

    action: ClassVar[str] = "resume"


# ------------------------------------------------------------------------------------- bus

Subscriber = Callable[[Event], None]


class EventBus:
    """Thread-safe fan-out of events to subscribers.

    ``publish`` calls each subscriber synchronously in the publisher's thread, so subscribers
    must only hand the event on (``loop.call_soon_threadsafe``, ``queue.put_nowait``,
    ``App.post_message``) and never block: the 80 ms tick publishes here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    def publish(self, event: Event) -> None:
        for subscriber in self._subscribers:  # a snapshot: (un)subscribing never races this
            try:
                subscriber(event)
            except Exception:  # one broken subscriber must not stop the others or the tick
                _log.exception("subscriber failed on %s", type(event).__name__)
