"""Framing between Twilio's 20 ms mu-law chunks and the model's 80 ms frames.

Inbound, ``InboundFrames`` is the per-call jitter buffer: it collects chunks with their
arrival times and hands the scheduler one 640-byte (80 ms at 8 kHz) frame per tick. Why the
alignment logic: every call arrives with its own 20 ms phase against our single 80 ms tick.
Grouping chunks 1-4, 5-8, ... blindly would make a call wait up to 80 ms for the tick; we
instead choose, once, the frame boundary that ends on the newest chunk that arrived at least
``guard_s`` before a tick, so the wait is ``guard_s`` plus at most one chunk (20 ms). After that
frames are taken strictly in order.

A frame whose chunks have not all arrived by the tick is concealed: what did arrive is used and
the gap is filled with silence. It counts as late once more audio arrives: a frame concealed at
a tick just before the caller's ``stop`` is where the stream ended (the caller hung up part way
through a frame), not audio that came late. The buffer then adapts: it keeps the last missing
chunk when it comes (one more chunk, 20 ms, of margin against this caller's jitter, up to
``max_depth``) and discards the rest (a late packet is a lost packet), so a stall never shifts
the stream by more than the margin. A margin unused for ``relax_after_ticks`` is given back,
and a backlog beyond the margin that persists (the caller's clock runs fast, a burst after a
stall) is trimmed, so the delay cannot creep up.

Outbound is simpler: one 640-byte frame becomes four 160-byte payloads.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from engine.audio.mulaw import SILENCE
from engine.models.base import FRAME_SIZE

CHUNK_BYTES = 160
"""One Twilio media payload: 20 ms of 8 kHz mu-law."""
CHUNKS_PER_FRAME = 4
FRAME_BYTES = CHUNK_BYTES * CHUNKS_PER_FRAME
"""One 80 ms frame at 8 kHz (640 samples, 1920 at 24 kHz)."""


def split_frame(codes: bytes) -> list[bytes]:
    """One 640-byte frame -> four 160-byte payloads, in play order."""
    return [codes[i : i + CHUNK_BYTES] for i in range(0, len(codes), CHUNK_BYTES)]


class InboundFrames:
    """One call's inbound mu-law bytes -> one aligned 80 ms frame per tick."""

    def __init__(
        self, guard_s: float = 0.004, trim_after_ticks: int = 12, max_depth: int = 1, relax_after_ticks: int = 125
    ) -> None:
        self.guard_s = guard_s
        self.trim_after_ticks = trim_after_ticks
        self.max_depth = max_depth
        self.relax_after_ticks = relax_after_ticks
        self._buf = bytearray()
        self._arrivals: deque[tuple[int, float]] = deque()  # (cumulative end offset, time)
        self._in = 0  # bytes ever pushed (plus silence padding)
        self._out = 0  # bytes ever consumed or dropped
        self._aligned = False
        self._backlog_ticks = 0
        self._clean_ticks = 0
        self._skip = 0  # bytes still to discard: they were concealed with silence already
        self.depth = 0
        """Extra chunks of margin this caller's jitter has earned (0 .. max_depth)."""
        self.preroll = 0
        """Ticks that passed before the first frame (nothing eligible yet)."""
        self.lead = 0
        """Alignment of the first frame: silence bytes put in front (negative: oldest bytes dropped)."""
        self.late = 0
        """Concealed frames that more audio followed (see the module docstring)."""
        self._concealed = 0  # concealed since the last payload: late if the stream goes on
        self.dropped_bytes = 0

    @property
    def started(self) -> bool:
        return self._in > 0

    @property
    def buffered(self) -> int:
        return self._in - self._out

    def push(self, payload: bytes, at: float) -> None:
        """Queue one media payload that arrived at monotonic time ``at``."""
        self.late += self._concealed
        self._concealed = 0
        if self._skip:
            skipped = min(self._skip, len(payload))
            self._skip -= skipped
            self.dropped_bytes += skipped
            payload = payload[skipped:]
        if payload:
            self._buf += payload
            self._in += len(payload)
            self._arrivals.append((self._in, at))

    def pop(self, tick_at: float) -> tuple[bytes | None, float | None]:
        """The frame for the tick firing at ``tick_at``: (640 bytes, arrival of its last chunk).
        A late frame comes back concealed (silence where chunks are missing) with no arrival
        time; (None, None) before the caller has sent anything."""
        eligible = self._eligible_end(tick_at) - self._out
        if not self._aligned:
            if eligible <= 0:
                self.preroll += 1
                return None, None
            self._align(eligible)
            eligible = FRAME_BYTES
        elif self.buffered < FRAME_BYTES:  # the guard only sets the phase; any byte here counts
            return self._conceal(self.buffered), None
        else:
            stale = eligible - FRAME_BYTES - self.depth * CHUNK_BYTES
            if stale >= FRAME_BYTES:  # a burst after a stall: play the newest audio, not a backlog
                self._drop(stale)
                self.dropped_bytes += stale
        end = self._out + FRAME_BYTES
        completed_at = next(t for cum, t in self._arrivals if cum >= end)
        frame = bytes(self._buf[:FRAME_BYTES])
        self._drop(FRAME_BYTES)
        self._clean_ticks += 1
        if self.depth and self._clean_ticks >= self.relax_after_ticks:
            self.depth -= 1  # the margin went unused: give it back (the trim below cuts it)
            self._clean_ticks = 0
        self._trim(self._eligible_end(tick_at) - self._out)
        return frame, completed_at

    def _conceal(self, have: int) -> bytes:
        """A concealed frame: the bytes that made it, then silence. The missing bytes are discarded
        when they come, except the last chunk while the margin may still grow."""
        self._concealed += 1
        frame = bytes(self._buf[:have]) + bytes([SILENCE]) * (FRAME_BYTES - have)
        self._drop(have)
        owed = FRAME_BYTES - have
        if self.depth < self.max_depth and owed >= CHUNK_BYTES:
            self.depth += 1
            owed -= CHUNK_BYTES
        self._skip = owed
        self._backlog_ticks = 0
        self._clean_ticks = 0
        return frame

    def _eligible_end(self, tick_at: float) -> int:
        """Cumulative offset of the last byte that arrived at least ``guard_s`` before the tick."""
        cutoff = tick_at - self.guard_s
        for cum, t in reversed(self._arrivals):
            if t <= cutoff:
                return cum
        return self._out

    def _align(self, eligible: int) -> None:
        """First frame: pad with silence in front (short) or drop the oldest audio (long), so
        the frame ends exactly on the newest eligible chunk."""
        if eligible < FRAME_BYTES:
            pad = FRAME_BYTES - eligible
            self._buf[0:0] = bytes([SILENCE]) * pad
            self._out -= pad
            self.lead = pad
        elif eligible > FRAME_BYTES:
            self._drop(eligible - FRAME_BYTES)
            self.dropped_bytes += eligible - FRAME_BYTES
            self.lead = FRAME_BYTES - eligible
        self._aligned = True

    def _trim(self, backlog: int) -> None:
        """Drop a backlog beyond the margin that has lasted ``trim_after_ticks`` ticks."""
        excess = backlog - self.depth * CHUNK_BYTES
        if excess < CHUNK_BYTES:
            self._backlog_ticks = 0
            return
        self._backlog_ticks += 1
        if self._backlog_ticks >= self.trim_after_ticks:
            self._drop(excess)
            self.dropped_bytes += excess
            self._backlog_ticks = 0

    def _drop(self, n: int) -> None:
        del self._buf[:n]
        self._out += n
        while self._arrivals and self._arrivals[0][0] <= self._out:
            self._arrivals.popleft()


class PcmFrames:
    """Float32 24 kHz audio of any chunk length -> whole 1920-sample frames (operator audio,
    the local microphone). Holds at most ``max_frames`` so a stalled consumer cannot grow it."""

    def __init__(self, max_frames: int = 25) -> None:
        self._parts: deque[np.ndarray] = deque()
        self._size = 0
        self.max_samples = max_frames * FRAME_SIZE
        self.dropped = 0

    def __len__(self) -> int:
        return self._size

    def push(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size:
            self._parts.append(pcm)
            self._size += pcm.size
        excess = self._size - self.max_samples
        if excess > 0:  # keep the newest audio: the oldest is already too late to play
            self._take(excess)
            self.dropped += excess

    def pop(self) -> np.ndarray | None:
        """One 1920-sample frame, or None when less than a frame is buffered."""
        if self._size < FRAME_SIZE:
            return None
        return self._take(FRAME_SIZE)

    def _take(self, n: int) -> np.ndarray:
        out = np.empty(n, np.float32)
        filled = 0
        while filled < n:
            part = self._parts[0]
            use = min(n - filled, part.size)
            out[filled : filled + use] = part[:use]
            filled += use
            if use == part.size:
                self._parts.popleft()
            else:
                self._parts[0] = part[use:]
        self._size -= n
        return out
