"""This machine's speakers and microphone for listen-in and takeover (embedded mode).

Why it is optional: an operator over SSH, a CI box or a container has no sound device, and the
console must still work. ``open_audio()`` returns either a ``LocalAudio`` or a plain sentence
saying why there is none (no PortAudio library, no device), which the UI shows as is.

Frames are float32 mono at 24 kHz, 1920 samples per 80 ms, as ``CallSession`` taps deliver
them. PortAudio calls our callbacks on its own thread; they only move numpy buffers.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("xswarm.tui.audio")

RATE = 24_000
FRAME = 1920
_MAX_QUEUED = 6
"""Frames buffered per direction before old ones are dropped: ~0.5 s, so listening never drifts."""


class LocalAudio:
    """A speaker stream mixing what a call's taps deliver, and a microphone stream on demand."""

    def __init__(self, sd: Any) -> None:
        self._sd = sd
        self._lock = threading.Lock()
        self._queues: dict[str, deque[np.ndarray]] = {"caller": deque(), "ai": deque()}
        self._out: Any = None
        self._mic: Any = None

    # ---------------------------------------------------------------- speakers (listen)
    def play(self, direction: str, frame: np.ndarray) -> None:
        """Tap callback: queue one frame of one direction for the speakers (any thread)."""
        with self._lock:
            q = self._queues.setdefault(direction, deque())
            q.append(np.asarray(frame, dtype=np.float32))
            while len(q) > _MAX_QUEUED:
                q.popleft()

    def start_speakers(self) -> None:
        if self._out is None:
            self._out = self._sd.OutputStream(
                samplerate=RATE, channels=1, dtype="float32", blocksize=FRAME, callback=self._fill
            )
            self._out.start()

    def stop_speakers(self) -> None:
        if self._out is not None:
            self._out.stop()
            self._out.close()
            self._out = None
        with self._lock:
            for q in self._queues.values():
                q.clear()

    def _fill(self, out: np.ndarray, frames: int, _time: Any, _status: Any) -> None:
        mix = np.zeros(frames, dtype=np.float32)
        with self._lock:
            for q in self._queues.values():
                if q:
                    frame = q.popleft()
                    n = min(frames, len(frame))
                    mix[:n] += frame[:n]
        out[:, 0] = np.clip(mix, -1.0, 1.0)

    # ----------------------------------------------------------------- microphone (talk)
    def start_microphone(self, sink: Callable[[np.ndarray], None]) -> None:
        """Send each 80 ms microphone frame to ``sink`` (called on PortAudio's thread)."""
        self.stop_microphone()

        def capture(data: np.ndarray, _frames: int, _time: Any, _status: Any) -> None:
            sink(data[:, 0].copy())

        self._mic = self._sd.InputStream(
            samplerate=RATE, channels=1, dtype="float32", blocksize=FRAME, callback=capture
        )
        self._mic.start()

    def stop_microphone(self) -> None:
        if self._mic is not None:
            self._mic.stop()
            self._mic.close()
            self._mic = None

    # ------------------------------------------------------------- recordings (history)
    def play_clip(self, samples: np.ndarray, rate: int) -> None:
        """Play a stored recording (mono float32) once, in the background; ``stop_clip`` ends it."""
        self._sd.play(np.asarray(samples, dtype=np.float32), rate)

    def stop_clip(self) -> None:
        self._sd.stop()

    def close(self) -> None:
        self.stop_microphone()
        self.stop_speakers()


def open_audio() -> LocalAudio | str:
    """The sound device, or the reason there is none, in words an operator can act on."""
    from engine.bridge.local_audio import LocalAudioError, load_sounddevice

    try:
        sd = load_sounddevice()
        sd.query_devices(kind="output")
        sd.query_devices(kind="input")
    except LocalAudioError as exc:
        return str(exc)
    except Exception as exc:  # PortAudioError or ValueError: no default device
        return f"no audio device on this machine: {exc}"
    return LocalAudio(sd)
