"""A call from this machine's microphone and speakers: one more slot, no Twilio involved.

The sound card runs at 24 kHz (the model's rate), so no telephone transcoding happens: the
microphone's blocks go straight into the session's 24 kHz buffer, and each output frame is
queued for the speaker callback. PortAudio callbacks run on their own thread, so they only
hand data across (``call_soon_threadsafe`` in, a bounded deque out) and never block.

No sound card, no PortAudio, or no sounddevice package: ``LocalAudioError`` with a sentence
that says which, and nothing else is disturbed.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.calls import CallControlError, CallSession
from engine.tick import FRAME_SIZE, SAMPLE_RATE

if TYPE_CHECKING:
    import asyncio

    from engine.calls import CallRegistry
    from engine.events import EventBus


class AudioHost(Protocol):
    """What a local-audio call uses of the runtime."""

    @property
    def bus(self) -> EventBus: ...
    @property
    def calls(self) -> CallRegistry: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...


log = logging.getLogger("xswarm.local_audio")

MAX_QUEUED_FRAMES = 4
"""Speaker frames (320 ms) we let pile up before dropping the oldest: keep the call live."""


class LocalAudioError(CallControlError):
    """No usable sound device; the message says why, for the operator."""


def load_sounddevice() -> Any:
    try:
        import sounddevice
    except OSError as exc:  # the package is there, the PortAudio library is not
        raise LocalAudioError(f"no audio: {exc} (install PortAudio, e.g. apt install libportaudio2)") from None
    except ImportError:
        raise LocalAudioError(
            "no audio: the sounddevice package is not installed (pip install 'xswarm[audio]')"
        ) from None
    return sounddevice


class LocalAudioCall:
    """The transport of a local call: microphone in, speaker out."""

    source = "local"

    def __init__(self, runtime: AudioHost, sd: Any | None = None) -> None:
        self.runtime = runtime
        self._sd = sd
        self.session: CallSession | None = None
        self._speaker: collections.deque[np.ndarray] = collections.deque()
        self._lock = threading.Lock()
        self._streams: list[Any] = []

    async def open(self) -> CallSession:
        """Open the devices and admit the call (on the runtime loop)."""
        sd = self._sd or load_sounddevice()
        try:
            devices = sd.query_devices()
            if not len(devices) or sd.default.device is None:
                raise LocalAudioError("no audio: no sound devices found")
        except LocalAudioError:
            raise
        except Exception as exc:  # PortAudio errors are plain Exceptions
            raise LocalAudioError(f"no audio: {exc}") from None
        loop = self.runtime.loop
        session = CallSession("local-" + secrets.token_hex(6), self, bus=self.runtime.bus, caller="this machine")
        self.runtime.calls.admit(session)  # NoFreeSlot propagates as a CallControlError
        self.session = session

        def mic(indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
            loop.call_soon_threadsafe(session.feed_microphone, indata[:, 0].copy())

        def speaker(outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
            with self._lock:
                frame = self._speaker.popleft() if self._speaker else None
            if frame is None or frame.size != frames:
                outdata.fill(0)
                return
            outdata[:, 0] = frame

        try:
            self._streams = [
                sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=FRAME_SIZE, callback=mic),
                sd.OutputStream(
                    samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=FRAME_SIZE, callback=speaker
                ),
            ]
            for stream in self._streams:
                stream.start()
        except Exception as exc:
            self._close_streams()
            self.runtime.calls.finish(session, "audio device failed")
            raise LocalAudioError(f"no audio: cannot open the sound device ({exc})") from None
        log.info("local audio call %s started", session.call_id)
        return session

    # ------------------------------------------------------------------ transport

    def send_frame(self, session: CallSession, step: int, ulaw: bytes, pcm: np.ndarray) -> None:
        with self._lock:
            if len(self._speaker) >= MAX_QUEUED_FRAMES:
                self._speaker.popleft()
            self._speaker.append(pcm.copy())

    def clear(self) -> None:
        with self._lock:
            self._speaker.clear()

    async def hang_up(self, reason: str) -> None:
        await self.close(reason if reason.startswith("hung up") else f"hung up: {reason}")

    async def close(self, reason: str) -> None:
        self._close_streams()
        if self.session is not None:
            self.runtime.calls.finish(self.session, reason)

    def _close_streams(self) -> None:
        for stream in self._streams:
            try:
                stream.stop()
                stream.close()
            except Exception:
                log.exception("closing a sound stream failed")
        self._streams = []
