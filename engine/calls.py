"""Live calls: the per-call control surface (``CallSession``) and the slot table (``CallRegistry``).

A ``CallSession`` is everything one call owns while it is live: its slot in the model batch,
its inbound jitter buffer, its controls (mute, takeover, whisper, taps) and its latency
figures. Transports (the Twilio bridge, the local sound card) feed it and receive its output
frames; the scheduler reads its controls once per tick; supervisors act on it.

Threading: every method here runs on the runtime loop. Control methods only flip fields that
the next tick reads, so they are cheap and never wait for the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from engine import events
from engine.audio.framing import InboundFrames, PcmFrames
from engine.events import EventBus, Mode
from engine.snapshot import LiveCall
from engine.telemetry.latency import Histogram

log = logging.getLogger("xswarm.calls")

Tap = Callable[[str, np.ndarray], None]


class CallControlError(ValueError):
    """A control that cannot apply to this call now (someone else holds it, call ended, ...)."""


class NoFreeSlot(CallControlError):
    """Every slot of the model is taken (or no model is loaded yet)."""


class NoHeadroom(NoFreeSlot):
    """A slot is free, but the measured step time leaves no room for one more call."""


class Transport(Protocol):
    """How a call's audio leaves the machine (Twilio socket, local speaker)."""

    source: str

    def send_frame(self, session: CallSession, step: int, ulaw: bytes, pcm: np.ndarray) -> None:
        """Queue one 80 ms output frame (8 kHz mu-law and 24 kHz float); never blocks."""

    def clear(self) -> None:
        """Drop audio already queued for the caller (takeover, hand-back, mute)."""

    async def hang_up(self, reason: str) -> None:
        """End the call from our side."""

    async def close(self, reason: str) -> None:
        """Drop the stream only (Twilio then runs the TwiML after ``<Connect>``, e.g. voicemail)."""


class CallSession:
    """One live call. Created by a transport, admitted into a slot by the ``CallRegistry``."""

    def __init__(
        self,
        call_id: str,
        transport: Transport,
        *,
        bus: EventBus,
        caller: str | None = None,
        user_id: str | None = None,
        theme: str | None = None,
        stream_sid: str | None = None,
        inbound: InboundFrames | None = None,
    ) -> None:
        self.call_id = call_id
        self.transport = transport
        self.source: str = transport.source
        self.caller = caller
        self.user_id = user_id
        self.theme = theme
        self.stream_sid = stream_sid
        self.slot = -1
        self.started_at = time.time()
        self.admitted_at = time.monotonic()
        self.first_tick_at: float | None = None
        self.inbound = inbound
        """Twilio calls: mu-law jitter buffer. None for sources that deliver 24 kHz frames."""
        self.mic = PcmFrames() if inbound is None else None
        """Local calls: the microphone's 24 kHz audio."""
        self.operator: str | None = None
        self.muted = False
        self.operator_audio = PcmFrames()
        self.pending_text: list[str] = []
        self.taps: list[Tap] = []
        self.ended = False
        self.end_reason: str | None = None
        self.bal = Histogram()
        self.playout_lag = Histogram()
        self.step_ms = 0.0
        self.in_level = 0.0
        self.out_level = 0.0
        self.frames_out = 0
        self.send_failed = False
        self.last_bal_ms: float | None = None
        self.last_lag_ms: float | None = None
        self.transcript: list[str] = []
        """AI text decoded since the last TranscriptAppended (coalesced by the scheduler)."""
        self.last_input_at: float | None = None
        """Arrival of the 4th chunk of the frame the last tick consumed (for BAL)."""
        self.last_tick_at = 0.0
        """When the tick that produced the frame being delivered fired."""
        self._bus = bus

    # ------------------------------------------------------------------------- state

    @property
    def mode(self) -> Mode:
        if self.operator is not None:
            return "operator"
        return "muted" if self.muted else "ai"

    @property
    def late_frames(self) -> int:
        return self.inbound.late if self.inbound is not None else 0

    def _changed(self) -> None:
        self._bus.publish(
            events.CallUpdated(call_id=self.call_id, mode=self.mode, operator=self.operator, listeners=len(self.taps))
        )

    def _check_live(self) -> None:
        if self.ended:
            raise CallControlError(f"call {self.call_id} has ended")

    # ---------------------------------------------------------------------- controls

    def mute(self, on: bool) -> None:
        """The AI keeps listening, but its audio is not sent; queued audio is cleared."""
        self._check_live()
        if on == self.muted:
            return
        self.muted = on
        if on:
            self.transport.clear()
        self._changed()

    def take_over(self, operator: str) -> None:
        """The operator's audio replaces the AI's from the next tick on."""
        self._check_live()
        if self.operator is not None and self.operator != operator:
            raise CallControlError(f"{self.operator} already holds call {self.call_id}")
        if self.operator == operator:
            return
        self.operator = operator
        self.operator_audio = PcmFrames()
        self.transport.clear()
        self._changed()

    def hand_back(self, operator: str) -> None:
        """Give the call back to the AI."""
        self._check_live()
        if self.operator is None:
            raise CallControlError(f"call {self.call_id} is not taken over")
        if self.operator != operator:
            raise CallControlError(f"{self.operator} holds call {self.call_id}, not {operator}")
        self.operator = None
        self.operator_audio = PcmFrames()
        self.transport.clear()
        self._changed()

    def feed_operator_audio(self, pcm24k: np.ndarray) -> None:
        """Operator speech (float32 mono 24 kHz, any length); played while taken over."""
        self._check_live()
        if self.operator is not None:
            self.operator_audio.push(pcm24k)

    def feed_microphone(self, pcm24k: np.ndarray) -> None:
        """Local calls: the caller's audio at 24 kHz (any chunk length)."""
        if self.mic is not None:
            self.mic.push(pcm24k)

    def whisper(self, text: str) -> None:
        """Force text into the AI's text stream at the next tick."""
        self._check_live()
        text = text.strip()
        if not text:
            raise CallControlError("nothing to whisper")
        self.pending_text.append(text)

    def add_tap(self, tap: Tap) -> Callable[[], None]:
        """Listen: ``tap(direction, frame)`` per tick per direction ("caller", "ai").
        Frames are float32 24 kHz views that must not be modified. Returns the remover."""
        self._check_live()
        self.taps.append(tap)
        self._changed()

        def remove() -> None:
            if tap in self.taps:
                self.taps.remove(tap)
                if not self.ended:
                    self._changed()

        return remove

    async def hang_up(self, reason: str) -> None:
        """End the call from our side (Twilio REST when configured; the socket always closes)."""
        if not self.ended:
            await self.transport.hang_up(reason)

    # -------------------------------------------------------------------- reporting

    def take_forced_text(self) -> str | None:
        if not self.pending_text:
            return None
        text = " ".join(self.pending_text)
        self.pending_text.clear()
        return text

    def live(self) -> LiveCall:
        """This call as the runtime's snapshot lists it."""
        return LiveCall(
            call_id=self.call_id,
            slot=self.slot,
            source=self.source,
            mode=self.mode,
            operator=self.operator,
            listeners=len(self.taps),
            caller=self.caller,
            user_id=self.user_id,
            theme=self.theme,
            started_at=self.started_at,
            duration_s=round(time.time() - self.started_at, 3),
            step_ms=round(self.step_ms, 3),
            bal_ms=self.bal.percentiles(50, 99),
            playout_lag_ms=self.playout_lag.percentiles(50, 95),
            late_frames=self.late_frames,
            admission_ms=None
            if self.first_tick_at is None
            else round((self.first_tick_at - self.admitted_at) * 1000, 3),
            frames_out=self.frames_out,
            in_level=round(self.in_level, 4),
            out_level=round(self.out_level, 4),
        )

    def summary(self) -> dict[str, Any]:
        """What the calls table keeps when the call ends."""
        return {
            "duration_s": round(time.time() - self.started_at, 3),
            "bal_p50_ms": self.bal.percentile(50),
            "bal_p99_ms": self.bal.percentile(99),
            "playout_lag_p50_ms": self.playout_lag.percentile(50),
            "late_frames": self.late_frames,
        }


class CallRegistry:
    """Live calls by id and by slot; admission into the model's fixed batch of slots."""

    def __init__(
        self,
        bus: EventBus,
        *,
        on_start: Callable[[CallSession], None] | None = None,
        on_end: Callable[[CallSession, str], None] | None = None,
    ) -> None:
        self._bus = bus
        self._by_id: dict[str, CallSession] = {}
        self.by_slot: list[CallSession | None] = []
        self.admitted: set[int] = set()
        """Slots filled since the scheduler's last gather (their model state must be reset)."""
        self.ended_late_frames = 0
        """Late frames of the calls that have ended (the live ones count their own)."""
        self._on_start = on_start
        self._on_end = on_end
        self.gate: Callable[[], str | None] | None = None
        """Why a new call would not be served in real time even with a free slot (None: it
        would); the scheduler installs its measured-headroom check here."""

    @property
    def capacity(self) -> int:
        return len(self.by_slot)

    def set_capacity(self, slots: int) -> None:
        """Size the slot table to the model (only while no call is live)."""
        if self._by_id:
            raise CallControlError("cannot resize slots while calls are live")
        self.by_slot = [None] * slots
        self.admitted.clear()

    @property
    def used(self) -> int:
        return len(self._by_id)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def available(self) -> int:
        """Slots a new call could get now: 0 while the gate refuses (what the heartbeat
        advertises, so the voice webhook routes calls elsewhere)."""
        if self.gate is not None and self.free and self.gate() is not None:
            return 0
        return self.free

    def get(self, call_id: str) -> CallSession | None:
        return self._by_id.get(call_id)

    def __iter__(self) -> Iterator[CallSession]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def admit(self, session: CallSession) -> int:
        """Give the call a free slot; raises ``NoFreeSlot`` when none is left and
        ``NoHeadroom`` when the model is measured too slow for one more call."""
        if session.call_id in self._by_id:
            raise CallControlError(f"call {session.call_id} is already live")
        try:
            slot = self.by_slot.index(None)
        except ValueError:
            raise NoFreeSlot("no model loaded" if not self.by_slot else f"all {self.capacity} slots are busy") from None
        reason = self.gate() if self.gate is not None else None
        if reason is not None:
            raise NoHeadroom(reason)
        session.slot = slot
        session.admitted_at = time.monotonic()
        self.by_slot[slot] = session
        self._by_id[session.call_id] = session
        self.admitted.add(slot)
        log.info("call %s admitted to slot %d (%s)", session.call_id, slot, session.source)
        self._bus.publish(
            events.CallStarted(
                call_id=session.call_id,
                slot=slot,
                source=session.source,
                caller=session.caller,
                user_id=session.user_id,
                theme=session.theme,
            )
        )
        if self._on_start is not None:
            self._on_start(session)
        return slot

    def finish(self, session: CallSession, reason: str) -> None:
        """Release the call's slot and record how it ended (idempotent)."""
        if session.ended:
            return
        session.ended = True
        session.end_reason = reason
        self.ended_late_frames += session.late_frames
        if self._by_id.get(session.call_id) is session:
            del self._by_id[session.call_id]
            if 0 <= session.slot < len(self.by_slot) and self.by_slot[session.slot] is session:
                self.by_slot[session.slot] = None
                self.admitted.discard(session.slot)
        duration = time.time() - session.started_at
        log.info(
            "call %s ended: %s after %.1f s (late frames %d)", session.call_id, reason, duration, session.late_frames
        )
        self._bus.publish(events.CallEnded(call_id=session.call_id, reason=reason, duration_s=round(duration, 3)))
        if self._on_end is not None:
            self._on_end(session, reason)
