"""Call recordings: a stereo WAV (caller left, AI or operator right) and a transcript per call.

Off unless ``recording.enabled`` is set AND the caller's user has ``recording_consent``; a
call without a known, consenting user is never written to disk. Audio comes from the call's
tap (``CallSession.add_tap``): both directions once per 80 ms tick, on the runtime loop, so
the tap only converts to 16-bit and appends to a buffered file (microseconds per tick).
When the call ends the WAV is finished and, with ``<call_id>.json`` (the transcript), uploaded
to ``recordings/<YYYY-MM-DD>/``; the local copies go once uploaded. An upload that fails
stays in the spool folder and is retried by ``upload_spooled`` (the service's rounds).

Spool file names carry the state: ``<id>.pending.wav`` until consent is confirmed (deleted
after a crash: nobody said yes), ``<id>.recording.wav`` while the call goes on (salvaged
after a crash: the header is rewritten from the bytes that made it to disk), ``<id>.wav`` +
``<id>.json`` when finished and waiting for upload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine import events
from engine.storage.base import ObjectStore, StorageError
from engine.storage.retention import prune_dated

log = logging.getLogger("xswarm.recordings")

PREFIX = "recordings/"
SAMPLE_RATE = 24_000
MAX_SKEW_FRAMES = 25
"""If one direction runs this many frames (2 s) ahead, the other is padded with silence."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_PENDING = ".pending.wav"
_RECORDING = ".recording.wav"
_WAV_HEADER = 44
"""Bytes of the header ``wave`` writes for 16-bit PCM."""


class Tappable(Protocol):
    def add_tap(self, tap: Callable[[str, np.ndarray], None]) -> Callable[[], None]: ...


class CallRecorder:
    """Writes one call's two directions into a stereo 16-bit WAV as frames arrive."""

    def __init__(
        self, call_id: str, folder: Path, *, user_id: str | None, caller: str | None, started_at: float
    ) -> None:
        self.call_id = call_id
        self.user_id = user_id
        self.caller = caller
        self.started_at = started_at
        self.transcript: list[dict[str, Any]] = []
        self.path = folder / f"{_safe(call_id)}{_PENDING}"
        self._file = open(self.path, "wb", buffering=1 << 20)
        self._wav: wave.Wave_write | None = wave.open(self._file, "wb")
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._queues: dict[str, deque[np.ndarray]] = {"caller": deque(), "ai": deque()}
        self.frames = 0
        self.remove_tap: Callable[[], None] | None = None
        self.consent: asyncio.Task[bool] | None = None

    def tap(self, direction: str, frame: np.ndarray) -> None:
        queue = self._queues.get(direction)
        if queue is None or self._wav is None:
            return
        queue.append((np.clip(frame, -1.0, 1.0) * 32767.0).astype(np.int16))
        self._drain(final=False)

    def _drain(self, *, final: bool) -> None:
        left, right = self._queues["caller"], self._queues["ai"]
        while left and right:
            self._write(left.popleft(), right.popleft())
        for ahead in (left, right):
            while ahead and (final or len(ahead) > MAX_SKEW_FRAMES):
                frame = ahead.popleft()
                silence = np.zeros_like(frame)
                if ahead is left:
                    self._write(frame, silence)
                else:
                    self._write(silence, frame)

    def _write(self, caller: np.ndarray, ai: np.ndarray) -> None:
        n = min(len(caller), len(ai))
        stereo = np.empty((n, 2), dtype="<i2")
        stereo[:, 0] = caller[:n]
        stereo[:, 1] = ai[:n]
        assert self._wav is not None
        self._wav.writeframes(stereo.tobytes())
        self.frames += n

    def add_line(self, speaker: str, text: str, at: float) -> None:
        self.transcript.append({"at": round(at - self.started_at, 3), "speaker": speaker, "text": text})

    def confirm(self) -> None:
        """Consent is confirmed: from now on a crash leaves a file worth salvaging."""
        recording = self.path.with_name(self.path.name.replace(_PENDING, _RECORDING))
        self.path.replace(recording)  # the open handle keeps writing into the renamed file
        self.path = recording

    def finish(self, ended_at: float, reason: str) -> tuple[Path, Path]:
        """Close the WAV (writing its header) and write the transcript; returns both paths."""
        if self._wav is not None:
            self._drain(final=True)
            self._wav.close()
            self._file.close()
            self._wav = None
        done = self.path.with_name(f"{_safe(self.call_id)}.wav")
        sidecar = _write_sidecar(
            done,
            call_id=self.call_id,
            user_id=self.user_id,
            caller=self.caller,
            started_at=self.started_at,
            ended_at=ended_at,
            end_reason=reason,
            frames=self.frames,
            transcript=self.transcript,
        )
        self.path.replace(done)  # last: a finished pair is what the spool retry looks for
        self.path = done
        return done, sidecar

    def discard(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._file.close()
            self._wav = None
        self.path.unlink(missing_ok=True)


class CallRecordings:
    """Follows the bus: starts a recorder at CallStarted, uploads at CallEnded.

    ``sessions(call_id)`` finds the live call (``runtime.calls.get``); ``consent(user_id)``
    says whether that user agreed to be recorded (awaitable). Events arrive on any thread and
    are handed to ``loop``; everything else runs there.
    """

    def __init__(
        self,
        *,
        bus: events.EventBus,
        loop: asyncio.AbstractEventLoop,
        sessions: Callable[[str], Tappable | None],
        consent: Callable[[str], Any],
        store: ObjectStore,
        spool: Path,
    ) -> None:
        self.bus = bus
        self.loop = loop
        self.sessions = sessions
        self.consent = consent
        self.store = store
        self.spool = spool
        self.active: dict[str, CallRecorder] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        recover_spool(self.spool)
        self._unsubscribe = self.bus.subscribe(self._on_event)

    def _on_event(self, event: events.Event) -> None:
        if isinstance(event, (events.CallStarted, events.CallEnded, events.TranscriptAppended)):
            self.loop.call_soon_threadsafe(self._handle, event)

    def _handle(self, event: events.Event) -> None:
        if isinstance(event, events.CallStarted):
            self._begin(event)
        elif isinstance(event, events.TranscriptAppended):
            recorder = self.active.get(event.call_id)
            if recorder is not None:
                recorder.add_line(event.speaker, event.text, event.at)
        elif isinstance(event, events.CallEnded):
            recorder = self.active.pop(event.call_id, None)
            if recorder is not None:
                self._detach(recorder)
                self._spawn(self._finish(recorder, event.at, event.reason))

    def _begin(self, event: events.CallStarted) -> None:
        if event.user_id is None:
            return  # nobody to ask for consent: never recorded
        session = self.sessions(event.call_id)
        if session is None:
            return
        try:
            recorder = CallRecorder(
                event.call_id, self.spool, user_id=event.user_id, caller=event.caller, started_at=event.at
            )
        except OSError as exc:
            log.error("cannot record %s: %s", event.call_id, exc)
            return
        # Tap at once so the first second is kept; drop it all if consent turns out missing.
        recorder.remove_tap = session.add_tap(recorder.tap)
        self.active[event.call_id] = recorder
        recorder.consent = self._spawn(self._check_consent(recorder))

    async def _check_consent(self, recorder: CallRecorder) -> bool:
        try:
            agreed = bool(await self.consent(recorder.user_id or ""))
        except Exception:
            log.exception("consent lookup failed for %s; not recording", recorder.call_id)
            agreed = False
        if agreed:
            recorder.confirm()
        elif self.active.get(recorder.call_id) is recorder:
            del self.active[recorder.call_id]
            self._detach(recorder)
            recorder.discard()
        return agreed

    @staticmethod
    def _detach(recorder: CallRecorder) -> None:
        if recorder.remove_tap is not None:
            try:
                recorder.remove_tap()
            except Exception:
                log.debug("tap of %s already gone", recorder.call_id)
            recorder.remove_tap = None

    async def _finish(self, recorder: CallRecorder, ended_at: float, reason: str) -> None:
        if recorder.consent is not None and not await recorder.consent:
            recorder.discard()  # the call ended before the answer came: it was a no
            return
        wav, sidecar = recorder.finish(ended_at, reason)
        await self._upload(wav, sidecar)

    async def _upload(self, wav: Path, sidecar: Path) -> bool:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        day = datetime.fromtimestamp(record["started_at"], UTC).strftime("%Y-%m-%d")
        base = f"{PREFIX}{day}/{wav.stem}"
        metadata = {"call-id": _safe(record["call_id"]), "duration-s": str(record["duration_s"])}
        try:
            await self.store.aput_file(f"{base}.wav", wav, metadata)
            await self.store.aput_file(f"{base}.json", sidecar, metadata)
        except StorageError as exc:
            log.error("recording of %s not uploaded (kept in %s): %s", record["call_id"], self.spool, exc)
            return False
        wav.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        log.info("recording of %s uploaded to %s", record["call_id"], base)
        return True

    async def upload_spooled(self) -> int:
        """Retry finished recordings left behind by a failed upload or a restart."""
        done = 0
        for sidecar in sorted(self.spool.glob("*.json")):
            wav = sidecar.with_suffix(".wav")
            if wav.exists() and await self._upload(wav, sidecar):
                done += 1
        return done

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop listening; finish and upload what is still recording."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await asyncio.sleep(0)  # let events already handed to the loop land
        for call_id in list(self.active):
            recorder = self.active.pop(call_id)
            self._detach(recorder)
            self._spawn(self._finish(recorder, time.time(), "node stopped"))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)


def recover_spool(spool: Path) -> int:
    """After a crash: drop recordings never consented to, and turn interrupted ones into
    finished pairs (WAV header rebuilt from the bytes on disk) for the next upload round."""
    for pending in spool.glob(f"*{_PENDING}"):
        pending.unlink(missing_ok=True)
    recovered = 0
    for path in spool.glob(f"*{_RECORDING}"):
        try:
            raw = path.read_bytes()[_WAV_HEADER:]
            raw = raw[: len(raw) - len(raw) % 4]  # whole stereo 16-bit frames only
            call_id = path.name[: -len(_RECORDING)]
            done = path.with_name(f"{call_id}.wav")
            with wave.open(str(done), "wb") as out:
                out.setnchannels(2)
                out.setsampwidth(2)
                out.setframerate(SAMPLE_RATE)
                out.writeframes(raw)
            frames = len(raw) // 4
            ended = path.stat().st_mtime
            _write_sidecar(
                done,
                call_id=call_id,
                user_id=None,
                caller=None,
                started_at=ended - frames / SAMPLE_RATE,
                ended_at=ended,
                end_reason="recovered after a restart",
                frames=frames,
                transcript=[],
            )
            path.unlink()
            recovered += 1
        except OSError as exc:
            log.error("cannot recover %s: %s", path, exc)
    if recovered:
        log.warning("recovered %d interrupted recording(s) in %s", recovered, spool)
    return recovered


def _write_sidecar(
    wav: Path,
    *,
    call_id: str,
    user_id: str | None,
    caller: str | None,
    started_at: float,
    ended_at: float,
    end_reason: str,
    frames: int,
    transcript: list[dict[str, Any]],
) -> Path:
    sidecar = wav.with_suffix(".json")
    sidecar.write_text(
        json.dumps(
            {
                "call_id": call_id,
                "user_id": user_id,
                "caller": caller,
                "started_at": started_at,
                "ended_at": ended_at,
                "end_reason": end_reason,
                "duration_s": round(frames / SAMPLE_RATE, 3),
                "audio": {"channels": ["caller", "ai_or_operator"], "sample_rate": SAMPLE_RATE, "format": "pcm_s16le"},
                "transcript": transcript,
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    return sidecar


@dataclass(frozen=True)
class StoredRecording:
    """One uploaded recording: its audio object and, if uploaded too, its transcript."""

    call_sid: str
    """The call id as stored (``_safe``: characters outside ``[A-Za-z0-9._=+-]`` became ``_``)."""
    day: str
    """``YYYY-MM-DD`` (UTC) the call started."""
    key: str
    size_bytes: int
    uploaded_at: float
    transcript_key: str | None


def list_recordings(store: ObjectStore) -> list[StoredRecording]:
    """Every uploaded recording, newest call day first (then newest upload first)."""
    objects = store.list(PREFIX)
    keys = {o.key for o in objects}
    found = []
    for o in objects:
        parts = o.key[len(PREFIX) :].split("/")
        if len(parts) != 2 or not parts[1].endswith(".wav"):
            continue
        transcript = o.key[: -len(".wav")] + ".json"
        found.append(
            StoredRecording(
                call_sid=parts[1][: -len(".wav")],
                day=parts[0],
                key=o.key,
                size_bytes=o.size,
                uploaded_at=o.modified,
                transcript_key=transcript if transcript in keys else None,
            )
        )
    found.sort(key=lambda r: (r.day, r.uploaded_at), reverse=True)
    return found


def find_recording(store: ObjectStore, call_sid: str) -> StoredRecording | None:
    """The uploaded recording of one call, or None."""
    wanted = _safe(call_sid)
    return next((r for r in list_recordings(store) if r.call_sid == wanted), None)


def prune_recordings(store: ObjectStore, retention_days: int, *, now: float | None = None) -> list[str]:
    """Delete recordings (audio and transcript) older than the retention; returns the keys."""
    return prune_dated(store, PREFIX, retention_days, now=now)


def _safe(call_id: str) -> str:
    return _UNSAFE.sub("_", call_id)[:128] or "call"
