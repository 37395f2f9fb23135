"""The runtime's snapshot: what a console or supervisor needs to start from, typed.

``Runtime.snapshot()`` builds a ``Snapshot`` and sends its wire form (``to_wire``, plain JSON
objects); the supervisor protocol carries it in its ``snapshot`` frame, and the console reads
it back with ``read_snapshot``. Reading is lenient by design, because a snapshot may come from
another node or an older version: a section that is absent or malformed reads as None, and a
malformed call entry is left out without hiding the others. The diagnostic sections
(scheduler, bridge, storage) are open dictionaries: they are shown, not interpreted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError

from engine.events import Mode, ModelLoad

ModelState = Literal["idle"] | ModelLoad
T = TypeVar("T")


@dataclass(frozen=True)
class NodeInfo:
    id: str
    started_at: float | None = None
    uptime_s: float | None = None
    bridge_port: int | None = None
    supervisor_port: int | None = None
    webhooks_port: int | None = None
    bridge_url: str | None = None
    """What the voice webhook puts in TwiML for this node."""
    supervisor_url: str | None = None
    """Where a fleet console reaches this node's supervisor."""
    state: str | None = None
    """The operator's choice, read back with each heartbeat: "ready" or "draining"."""
    version: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    """The model asked for (``auto``, ``moshi``, ``synthetic:7b`` …)."""
    name: str | None
    """The model serving, once loaded."""
    state: ModelState
    detail: str = ""
    progress: float | None = None
    facts: dict[str, Any] | None = None
    """What the loaded model says of itself (``VoiceModel.describe``)."""


@dataclass(frozen=True)
class SlotInfo:
    total: int | None = None
    used: int | None = None
    free: int | None = None
    available: int | None = None
    """Free slots the node will actually fill (none while it has no headroom). The counts are
    None only when a sender left them out (the runtime never does)."""
    no_headroom: str | None = None
    """Why new calls are refused for lack of headroom; None while admitting."""


@dataclass(frozen=True)
class LiveCall:
    call_id: str
    slot: int = 0
    source: str = "twilio"
    mode: Mode | None = None
    """None only when a sender did not say (the runtime always does)."""
    operator: str | None = None
    listeners: int = 0
    caller: str | None = None
    user_id: str | None = None
    theme: str | None = None
    started_at: float = 0.0
    duration_s: float | None = None
    step_ms: float | None = None
    bal_ms: dict[str, float | None] = field(default_factory=dict)
    playout_lag_ms: dict[str, float | None] = field(default_factory=dict)
    late_frames: int = 0
    admission_ms: float | None = None
    frames_out: int = 0
    in_level: float = 0.0
    out_level: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    node: NodeInfo | None
    model: ModelInfo | None
    slots: SlotInfo | None
    calls: list[LiveCall] | None
    """None when the snapshot did not list calls (then it says nothing about which ended)."""
    recent_events: list[dict[str, Any]] = field(default_factory=list)
    """Recent events in their wire form (``engine.events.from_wire`` reads them)."""
    scheduler: dict[str, Any] | None = None
    bridge: dict[str, Any] | None = None
    storage: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}
"""Built on first use: building one costs tens of ms, which the console's first paint must
not pay."""


def read_snapshot(data: dict[str, Any]) -> Snapshot:
    """The typed form of a snapshot's wire form (see the module docstring for what is lenient)."""
    calls = data.get("calls")
    events = data.get("recent_events")
    return Snapshot(
        node=_section(NodeInfo, data.get("node")),
        model=_section(ModelInfo, data.get("model")),
        slots=_section(SlotInfo, data.get("slots")),
        calls=[c for c in (_section(LiveCall, entry) for entry in calls) if c is not None]
        if isinstance(calls, list)
        else None,
        recent_events=[e for e in events if isinstance(e, dict)] if isinstance(events, list) else [],
        scheduler=_open(data.get("scheduler")),
        bridge=_open(data.get("bridge")),
        storage=_open(data.get("storage")),
    )


def prepare_reader() -> None:
    """Build what ``read_snapshot`` needs now (tens of ms): the console calls this from the
    thread worker that opens its link, so its UI thread never pays for it."""
    for cls in (NodeInfo, ModelInfo, SlotInfo, LiveCall):
        _adapter(cls)


def _adapter(cls: type[T]) -> TypeAdapter[T]:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


def _section(cls: type[T], value: Any) -> T | None:
    if not isinstance(value, dict):
        return None
    try:
        return _adapter(cls).validate_python(value)
    except ValidationError:
        return None


def _open(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def section_schemas() -> dict[str, dict[str, Any]]:
    """JSON schemas of the typed sections (``node``, ``model``, ``slots``, one ``calls`` entry),
    for the supervisor protocol's document."""
    sections = {"node": NodeInfo, "model": ModelInfo, "slots": SlotInfo, "call": LiveCall}
    return {name: _untitled(TypeAdapter(cls).json_schema()) for name, cls in sections.items()}


def _untitled(schema: Any) -> Any:
    """pydantic's schema without the "title" it derives from every name."""
    if isinstance(schema, dict):
        return {k: _untitled(v) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [_untitled(v) for v in schema]
    return schema
