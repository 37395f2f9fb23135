"""The lockstep 80 ms tick: one batched model step for every live call.

Why lockstep: MOSHI's cost is dominated by the batched step, so every call shares ONE step
per 80 ms. Ticks are scheduled against the loop's monotonic clock at ``origin + k * 80 ms``
(never ``sleep(0.08)`` in a loop, which drifts by the work done each time); a tick that could
not run in its slot (the loop stalled, or the previous step overran) is counted as missed and
skipped, so the grid never shifts.

Per tick, on the runtime loop: gather one frame per live slot (a slot whose frame is not
complete gets silence and a late-frame count) and each slot's controls. On the single
inference thread: mu-law decode and 8k->24k for the whole batch, ``model.step``, takeover
audio, 24k->8k and mu-law encode for the whole batch (all numpy, one call per tick, not per
call). Back on the loop: hand each call its frame, feed taps, publish coalesced figures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine import events
from engine.audio import mulaw
from engine.audio.framing import FRAME_BYTES
from engine.audio.resample import Downsampler, Upsampler
from engine.calls import CallRegistry, CallSession
from engine.events import EventBus
from engine.gcpacer import GcPacer
from engine.models.base import StepInput, VoiceModel
from engine.tasks import cancel_and_wait
from engine.telemetry.latency import Histogram
from engine.tick import FRAME_S, FRAME_SIZE

log = logging.getLogger("xswarm.scheduler")

LATENCY_EVERY = 4
"""Ticks between a call's LatencySampled events (80 ms x 4 = 3.1 Hz, under the 4 Hz cap)."""
TICK_EVERY = 12
"""Ticks between TickSampled events (about once a second)."""
HEADROOM_WINDOW_S = 10.0
"""How far back admission looks at measured tick work and missed ticks."""
HEADROOM_MIN_STEPS = 8
"""Fewer steps than this in the window say nothing about the model's speed (admit)."""
HEADROOM_FRACTION = 0.9
"""A tick-work p90 above this share of the tick leaves no room for jitter: refuse new calls."""
HEADROOM_MISSED = 6
"""Missed ticks in the window (about 5 % of its 125 ticks) that refuse new calls."""


@dataclass
class _Batch:
    tick: int
    at: float
    sessions: list[CallSession | None]
    rows: int
    """Rows that hold a call (max live slot + 1): the resamplers skip the rest."""
    ulaw: np.ndarray
    pcm_rows: dict[int, np.ndarray]
    step_input: StepInput


@dataclass
class _Result:
    pcm_in: np.ndarray
    pcm_out: np.ndarray
    ulaw_out: np.ndarray
    ready: np.ndarray
    text: list[str]
    in_level: np.ndarray
    out_level: np.ndarray
    model_step_ms: float
    """``model.step`` alone."""
    tick_work_ms: float
    """From the tick's start to the results: gathering frames, the hand-off to the inference
    thread, DSP and the model step (what must fit in the tick, so what admission judges)."""


def _rms(x: np.ndarray) -> np.ndarray:
    """Per-row RMS level without a squared temporary."""
    return np.sqrt(np.einsum("ij,ij->i", x, x) / max(x.shape[1], 1)) if x.size else np.zeros(x.shape[0])


class Scheduler:
    """Runs the tick on the runtime loop and the model on its one inference thread."""

    def __init__(
        self,
        calls: CallRegistry,
        bus: EventBus,
        *,
        tick_s: float = FRAME_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.calls = calls
        self.bus = bus
        self.tick_s = tick_s
        self.clock = clock
        self.model: VoiceModel | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xswarm-infer")
        self.model_step_ms = Histogram()
        self.tick_work_ms = Histogram()
        self.admission_ms = Histogram()
        self.missed_ticks = 0
        self.failed_ticks = 0
        self.ticks = 0
        self.steps = 0
        self._window_steps: list[tuple[float, float]] = []
        """(model step ms, tick work ms) since the last TickSampled."""
        self._recent_work: deque[tuple[float, float]] = deque(maxlen=256)
        """(tick time, tick work ms) of recent ticks, for admission."""
        self._recent_missed: deque[tuple[float, int]] = deque(maxlen=256)
        """(time, ticks) missed while calls were live, for admission."""
        self._up: Upsampler | None = None
        self._down: Downsampler | None = None
        self._task: asyncio.Task[None] | None = None
        self.gc_pacer = GcPacer()
        """Runs the process's full garbage collections just after ticks (the runtime installs it)."""
        calls.gate = self.headroom  # the registry asks before it hands out a slot

    # -------------------------------------------------------------------- model

    def attach(self, model: VoiceModel) -> None:
        """Serve calls with a loaded model (on the loop, while no call is live)."""
        self.calls.set_capacity(model.slots)
        self._up = Upsampler(model.slots)
        self._down = Downsampler(model.slots)
        self.model = model

    # ---------------------------------------------------------------------- loop

    def start(self) -> None:
        """Start ticking on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xswarm-tick")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self) -> None:
        origin = self.clock()
        k = 0
        while True:
            k += 1
            deadline = origin + k * self.tick_s
            delay = deadline - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            now = self.clock()
            behind = int((now - deadline) / self.tick_s)
            if behind > 0:  # the loop stalled past whole ticks: skip them, keep the grid
                self.missed_ticks += behind
                k += behind
                if len(self.calls):
                    self._recent_missed.append((now, behind))
            self.ticks += 1
            try:
                await self.tick(now)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failing step must not stop every call's clock
                self.failed_ticks += 1
                if self.failed_ticks in (1, 10) or self.failed_ticks % 1000 == 0:  # never a line per tick
                    log.exception("tick %d failed (%d failures so far)", self.ticks, self.failed_ticks)
            self.gc_pacer.after_tick()  # the quietest moment: outputs sent, next tick ~80 ms away

    async def tick(self, now: float) -> None:
        """One tick: gather on the loop, compute on the inference thread, deliver on the loop."""
        if self.model is None or not len(self.calls):
            return
        batch = self.gather(now)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, self.compute, batch)
        self.deliver(batch, result)

    # --------------------------------------------------------------- the three phases

    def gather(self, now: float) -> _Batch:
        """Collect one frame and the controls of every live slot (runtime loop)."""
        assert self.model is not None
        slots = self.model.slots
        sessions = list(self.calls.by_slot)
        active = np.fromiter((s is not None for s in sessions), bool, slots)
        admitted = np.zeros(slots, bool)
        for slot in self.calls.admitted:
            admitted[slot] = True
        self.calls.admitted.clear()
        live = np.flatnonzero(active)
        rows = int(live[-1]) + 1 if live.size else 0
        ulaw = np.full((rows, FRAME_BYTES), mulaw.SILENCE, np.uint8)
        frame_slots: list[int] = []
        frames: list[bytes] = []
        pcm_rows: dict[int, np.ndarray] = {}
        takeover: np.ndarray | None = None
        operator_pcm: np.ndarray | None = None
        forced: dict[int, str] = {}
        for slot in live.tolist():
            s = sessions[slot]
            assert s is not None
            if s.first_tick_at is None:
                s.first_tick_at = now
                self.admission_ms.observe((now - s.admitted_at) * 1000)
            if s.inbound is not None:
                frame, completed_at = s.inbound.pop(now)
                s.last_input_at = completed_at
                if frame is not None:
                    frame_slots.append(slot)
                    frames.append(frame)
            elif s.mic is not None:
                mic = s.mic.pop()
                s.last_input_at = now if mic is not None else None
                if mic is not None:
                    pcm_rows[slot] = mic
            if s.operator is not None:
                if takeover is None:
                    takeover = np.zeros(slots, bool)
                    operator_pcm = np.zeros((slots, FRAME_SIZE), np.float32)
                takeover[slot] = True
                spoken = s.operator_audio.pop()
                if spoken is not None:
                    operator_pcm[slot] = spoken  # type: ignore[index]
            text = s.take_forced_text()
            if text:
                forced[slot] = text
        if frames:
            ulaw[frame_slots] = np.frombuffer(b"".join(frames), np.uint8).reshape(len(frames), FRAME_BYTES)
        step_input = StepInput(
            pcm=np.zeros((slots, FRAME_SIZE), np.float32),
            active=active,
            admitted=admitted,
            operator_pcm=operator_pcm,
            takeover=takeover,
            forced_text=forced,
        )
        self.steps += 1
        return _Batch(self.steps - 1, now, sessions, rows, ulaw, pcm_rows, step_input)

    def compute(self, batch: _Batch) -> _Result:
        """DSP and the model step for the whole batch (inference thread)."""
        assert self.model is not None and self._up is not None and self._down is not None
        inp = batch.step_input
        for slot in np.flatnonzero(inp.admitted).tolist():
            self._up.reset(slot)
            self._down.reset(slot)
        rows = batch.rows
        pcm8k_in = mulaw.decode(batch.ulaw)
        if rows:
            inp.pcm[:rows] = self._up.process(pcm8k_in)
        for slot, frame in batch.pcm_rows.items():
            inp.pcm[slot] = frame
        inp.pcm[~inp.active] = 0.0
        started = self.clock()
        out = self.model.step(inp)
        model_step_ms = (self.clock() - started) * 1000
        pcm_out = np.asarray(out.pcm, np.float32)
        if inp.takeover is not None and inp.operator_pcm is not None:
            # the caller hears the operator even if a model forgets to pass the audio through
            pcm_out = np.where(inp.takeover[:, None], inp.operator_pcm, pcm_out)
        pcm8k_out = self._down.process(pcm_out[:rows]) if rows else np.zeros((0, FRAME_BYTES), np.float32)
        ulaw_out = mulaw.encode(pcm8k_out)
        in_level = _rms(pcm8k_in)  # levels at 8 kHz: a third of the work, same meter reading
        out_level = _rms(pcm8k_out)
        for slot, frame in batch.pcm_rows.items():  # local calls have no 8 kHz input
            in_level[slot] = float(np.sqrt(np.mean(np.square(frame))))
        tick_work_ms = (self.clock() - batch.at) * 1000
        return _Result(
            inp.pcm,
            pcm_out,
            ulaw_out,
            np.asarray(out.ready, bool),
            list(out.text),
            in_level,
            out_level,
            model_step_ms,
            tick_work_ms,
        )

    def deliver(self, batch: _Batch, result: _Result) -> None:
        """Hand every call its output and publish coalesced figures (runtime loop)."""
        self.model_step_ms.observe(result.model_step_ms)
        self.tick_work_ms.observe(result.tick_work_ms)
        self._window_steps.append((result.model_step_ms, result.tick_work_ms))
        self._recent_work.append((batch.at, result.tick_work_ms))
        tick = batch.tick
        for slot in self._oldest_first(batch):
            s = batch.sessions[slot]
            if s is None or s.ended:
                continue
            s.step_ms = result.model_step_ms
            s.in_level = float(result.in_level[slot])
            s.out_level = float(result.out_level[slot])
            if s.taps:
                self._feed_taps(s, result.pcm_in[slot], result.pcm_out[slot])
            if result.ready[slot] and not s.muted:
                s.last_tick_at = batch.at
                try:
                    s.transport.send_frame(s, tick, result.ulaw_out[slot].tobytes(), result.pcm_out[slot])
                except Exception:  # one broken transport must not cost the other calls their frame
                    if not s.send_failed:
                        log.exception("call %s: sending a frame failed", s.call_id)
                    s.send_failed = True
                    continue
                s.frames_out += 1
            if result.text[slot]:
                s.transcript.append(result.text[slot])
            if (tick + slot) % LATENCY_EVERY == 0:
                self._publish_call(s)
        if tick % TICK_EVERY == 0 and self._window_steps:
            steps, work = np.asarray(self._window_steps).T
            self.bus.publish(
                events.TickSampled(
                    step_ms_p50=round(float(np.median(steps)), 3),
                    step_ms_max=round(float(steps.max()), 3),
                    active=len(self.calls),
                    slots=self.calls.capacity,
                    missed_ticks=self.missed_ticks,
                    tick_work_ms_p50=round(float(np.median(work)), 3),
                    tick_work_ms_max=round(float(work.max()), 3),
                )
            )
            self._window_steps.clear()

    @staticmethod
    def _oldest_first(batch: _Batch) -> list[int]:
        """Slots in the order their frames completed, oldest first (slots without input last).

        Why: a frame's bridge-added latency is its wait for the tick plus the time until its
        output is written, and writing 100 calls' output takes milliseconds. The calls whose
        frames waited longest for the tick are written first, so one call's long wait and
        a late place in the send order never add up."""
        sessions = batch.sessions[: batch.rows]
        never = float("inf")
        return sorted(
            range(len(sessions)),
            key=lambda slot: never if (s := sessions[slot]) is None or s.last_input_at is None else s.last_input_at,
        )

    def _publish_call(self, s: CallSession) -> None:
        self.bus.publish(
            events.LatencySampled(
                call_id=s.call_id,
                step_ms=round(s.step_ms, 3),
                bal_ms=s.last_bal_ms,
                playout_lag_ms=s.last_lag_ms,
                late_frames=s.late_frames,
                in_level=round(s.in_level, 4),
                out_level=round(s.out_level, 4),
            )
        )
        if s.transcript:
            text = "".join(s.transcript)
            s.transcript.clear()
            self.bus.publish(
                events.TranscriptAppended(call_id=s.call_id, text=text, speaker="operator" if s.operator else "ai")
            )

    @staticmethod
    def _feed_taps(s: CallSession, caller: np.ndarray, ai: np.ndarray) -> None:
        for tap in list(s.taps):
            try:
                tap("caller", caller)
                tap("ai", ai)
            except Exception:  # a broken listener is dropped once, not logged every frame
                log.exception("tap on call %s failed; removed", s.call_id)
                s.taps.remove(tap)

    @property
    def late_frames(self) -> int:
        """Late frames of every call this scheduler has carried (ended and live)."""
        return self.calls.ended_late_frames + sum(s.late_frames for s in self.calls)

    # ------------------------------------------------------------------ admission

    def headroom(self) -> str | None:
        """Why one more call would not be served in real time now; None when it would.

        Judged on what this machine measured in the last ``HEADROOM_WINDOW_S``: the p90 of
        the whole per-tick work (gathering, hand-off, DSP and the model step) against the tick, and the ticks
        missed while calls were live. No scaling by occupancy: the model steps its full,
        fixed batch every tick (idle rows are zeroed, not skipped), so one more call adds
        almost nothing to the step; what decides is whether the step fits at all. With no
        recent steps (no calls lately) there is no evidence, and the call is admitted: its
        own steps are the next measurement.
        """
        horizon = self.clock() - HEADROOM_WINDOW_S
        budget_ms = self.tick_s * 1000
        work = [ms for at, ms in self._recent_work if at >= horizon]
        if len(work) >= HEADROOM_MIN_STEPS:
            p90 = float(np.percentile(work, 90))
            if p90 > HEADROOM_FRACTION * budget_ms:
                return f"model has no headroom: tick work p90 {p90:.0f} ms of the {budget_ms:.0f} ms tick"
        missed = sum(n for at, n in self._recent_missed if at >= horizon)
        if missed >= HEADROOM_MISSED:
            return f"model has no headroom: {missed} ticks missed in {HEADROOM_WINDOW_S:.0f} s"
        return None

    def describe(self) -> dict[str, object]:
        return {
            "ticks": self.ticks,
            "steps": self.steps,
            "missed_ticks": self.missed_ticks,
            "no_headroom": self.headroom(),
            "late_frames": self.late_frames,
            "model_step_ms": self.model_step_ms.summary(),
            "tick_work_ms": self.tick_work_ms.summary(),
            "admission_ms": self.admission_ms.summary(),
            "gc_full_collections": self.gc_pacer.collections,
            "gc_last_pause_ms": self.gc_pacer.last_pause_ms,
        }
