"""Call recordings: consent, stereo layout, transcript, upload at call end, spool retry,
retention; then the same through the real Runtime with the echo model."""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine import events
from engine.storage import LocalStore
from engine.storage.recordings import SAMPLE_RATE, CallRecordings, prune_recordings

FRAME = 1920


class FakeCall:
    """Same tap surface as ``CallSession.add_tap``."""

    def __init__(self) -> None:
        self.taps: list[Callable[[str, np.ndarray], None]] = []

    def add_tap(self, tap: Callable[[str, np.ndarray], None]) -> Callable[[], None]:
        self.taps.append(tap)
        return lambda: self.taps.remove(tap) if tap in self.taps else None

    def tick(self, caller: np.ndarray, ai: np.ndarray) -> None:
        for tap in list(self.taps):
            tap("caller", caller)
            tap("ai", ai)


def tone(freq: float, n: int = FRAME, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / SAMPLE_RATE)).astype(np.float32)


def read_wav(data: bytes) -> tuple[int, int, np.ndarray]:
    with wave.open(io.BytesIO(data)) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        return w.getnchannels(), w.getframerate(), frames


async def settle(recordings: CallRecordings) -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)
        if not recordings._tasks:
            return


@pytest.fixture
def setup(tmp_path: Path) -> Callable[..., tuple[CallRecordings, dict[str, FakeCall], events.EventBus, LocalStore]]:
    def make(
        consenting: set[str] | None = None,
    ) -> tuple[CallRecordings, dict[str, FakeCall], events.EventBus, LocalStore]:
        bus = events.EventBus()
        calls: dict[str, FakeCall] = {}
        store = LocalStore(tmp_path / "objects")
        allowed = {"u1"} if consenting is None else consenting

        async def consent(user_id: str) -> bool:
            return user_id in allowed

        recordings = CallRecordings(
            bus=bus,
            loop=asyncio.get_running_loop(),
            sessions=calls.get,
            consent=consent,
            store=store,
            spool=tmp_path / "spool",
        )
        recordings.start()
        return recordings, calls, bus, store

    return make


async def test_consenting_call_is_recorded_in_stereo_with_transcript(setup) -> None:  # type: ignore[no-untyped-def]
    recordings, calls, bus, store = setup()
    call = calls["CA1"] = FakeCall()
    bus.publish(events.CallStarted(call_id="CA1", slot=0, source="twilio", caller="+15550001", user_id="u1"))
    await settle(recordings)
    assert len(call.taps) == 1
    for _ in range(25):  # 2 s
        call.tick(tone(440), tone(1000, amp=0.25))
    bus.publish(events.TranscriptAppended(call_id="CA1", text="hello there", speaker="ai"))
    bus.publish(events.TranscriptAppended(call_id="OTHER", text="not mine", speaker="ai"))
    bus.publish(events.CallEnded(call_id="CA1", reason="caller hung up", duration_s=2.0))
    await settle(recordings)
    assert call.taps == []
    keys = [i.key for i in store.list("recordings/")]
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert keys == [f"recordings/{day}/CA1.json", f"recordings/{day}/CA1.wav"]
    channels, rate, frames = read_wav(store.get_bytes(f"recordings/{day}/CA1.wav"))
    assert (channels, rate, len(frames)) == (2, SAMPLE_RATE, 25 * FRAME)
    left, right = frames[:, 0].astype(float), frames[:, 1].astype(float)
    assert np.abs(left).max() == pytest.approx(0.5 * 32767, rel=0.01)  # caller on the left
    assert np.abs(right).max() == pytest.approx(0.25 * 32767, rel=0.01)  # AI on the right
    expected_left = np.tile(tone(440), 25) * 32767
    assert np.abs(left - expected_left).max() < 2
    record = json.loads(store.get_bytes(f"recordings/{day}/CA1.json"))
    assert record["duration_s"] == 2.0 and record["end_reason"] == "caller hung up"
    assert [(t["speaker"], t["text"]) for t in record["transcript"]] == [("ai", "hello there")]
    assert list(recordings.spool.iterdir()) == []


async def test_no_consent_or_no_user_means_nothing_is_kept(setup) -> None:  # type: ignore[no-untyped-def]
    recordings, calls, bus, store = setup(consenting=set())
    calls["CA2"] = FakeCall()
    calls["CA3"] = FakeCall()
    bus.publish(events.CallStarted(call_id="CA2", slot=0, source="twilio", user_id="u2"))
    bus.publish(events.CallStarted(call_id="CA3", slot=1, source="twilio", user_id=None))
    await settle(recordings)
    assert calls["CA2"].taps == [] and calls["CA3"].taps == []
    bus.publish(events.CallEnded(call_id="CA2", reason="done", duration_s=1.0))
    await settle(recordings)
    assert store.list() == [] and list(recordings.spool.iterdir()) == []


async def test_a_silent_direction_is_padded_not_dropped(setup) -> None:  # type: ignore[no-untyped-def]
    recordings, calls, bus, store = setup()
    call = calls["CA4"] = FakeCall()
    bus.publish(events.CallStarted(call_id="CA4", slot=0, source="twilio", user_id="u1"))
    await settle(recordings)
    for _ in range(40):
        call.taps[0]("caller", tone(300))  # the AI side never arrives
    bus.publish(events.CallEnded(call_id="CA4", reason="done", duration_s=3.2))
    await settle(recordings)
    (wav,) = [i.key for i in store.list("recordings/") if i.key.endswith(".wav")]
    _, _, frames = read_wav(store.get_bytes(wav))
    assert len(frames) == 40 * FRAME and not frames[:, 1].any() and frames[:, 0].any()


async def test_failed_upload_is_spooled_and_retried(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    recordings, calls, bus, store = setup()
    (tmp_path / "blocked").write_text("a file where the store's folder should be")
    recordings.store = LocalStore(tmp_path / "blocked")
    call = calls["CA5"] = FakeCall()
    bus.publish(events.CallStarted(call_id="CA5", slot=0, source="twilio", user_id="u1"))
    await settle(recordings)
    call.tick(tone(200), tone(200))
    bus.publish(events.CallEnded(call_id="CA5", reason="done", duration_s=0.1))
    await settle(recordings)
    assert sorted(p.name for p in recordings.spool.iterdir()) == ["CA5.json", "CA5.wav"]
    recordings.store = store
    assert await recordings.upload_spooled() == 1
    assert len(store.list("recordings/")) == 2 and list(recordings.spool.iterdir()) == []


async def test_stop_finishes_calls_still_recording(setup) -> None:  # type: ignore[no-untyped-def]
    recordings, calls, bus, store = setup()
    call = calls["CA6"] = FakeCall()
    bus.publish(events.CallStarted(call_id="CA6", slot=0, source="twilio", user_id="u1"))
    await settle(recordings)
    call.tick(tone(200), tone(200))
    await recordings.stop()
    assert call.taps == [] and len(store.list("recordings/")) == 2


async def test_call_ending_before_the_consent_answer_keeps_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    recordings, calls, bus, store = setup()
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    recordings.consent = lambda _user: answer
    call = calls["CA7"] = FakeCall()
    bus.publish(events.CallStarted(call_id="CA7", slot=0, source="twilio", user_id="u1"))
    await asyncio.sleep(0.02)
    call.tick(tone(200), tone(200))
    bus.publish(events.CallEnded(call_id="CA7", reason="short", duration_s=0.1))
    await asyncio.sleep(0.02)
    answer.set_result(False)
    await settle(recordings)
    assert store.list() == [] and list(recordings.spool.iterdir()) == []


def test_a_crash_mid_call_is_recovered_and_unconsented_audio_dropped(tmp_path: Path) -> None:
    from engine.storage.recordings import CallRecorder, recover_spool

    spool = tmp_path / "spool"
    spool.mkdir()
    kept = CallRecorder("CA8", spool, user_id="u1", caller=None, started_at=time.time())
    kept.confirm()
    unasked = CallRecorder("CA9", spool, user_id="u2", caller=None, started_at=time.time())
    for _ in range(10):
        kept.tap("caller", tone(300))
        kept.tap("ai", tone(600))
        unasked.tap("caller", tone(300))
        unasked.tap("ai", tone(600))
    kept._file.flush()  # what the OS had when the process died; the WAV header was never finished
    unasked._file.flush()
    assert recover_spool(spool) == 1
    assert sorted(p.name for p in spool.iterdir()) == ["CA8.json", "CA8.wav"]
    channels, rate, frames = read_wav((spool / "CA8.wav").read_bytes())
    assert (channels, rate, len(frames)) == (2, SAMPLE_RATE, 10 * FRAME)
    assert json.loads((spool / "CA8.json").read_text())["end_reason"] == "recovered after a restart"


def test_recording_retention(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    store.put_bytes("recordings/2026-01-01/old.wav", b"x")
    store.put_bytes("recordings/2026-01-30/new.wav", b"x")
    now = time.mktime((2026, 2, 15, 12, 0, 0, 0, 0, 0)) - time.timezone
    assert prune_recordings(store, 30, now=now) == ["recordings/2026-01-01/old.wav"]
    assert [i.key for i in store.list()] == ["recordings/2026-01-30/new.wav"]


# ------------------------------------------------------------------- the real runtime


class LocalSink:
    source = "local"

    def __init__(self) -> None:
        self.frames = 0

    def send_frame(self, session: object, step: int, ulaw: bytes, pcm: np.ndarray) -> None:
        self.frames += 1

    def clear(self) -> None:
        pass

    async def hang_up(self, reason: str) -> None:
        pass


@pytest.mark.slow
def test_runtime_records_a_consenting_call_and_backs_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.calls import CallSession
    from engine.config import load_settings
    from engine.runtime import Runtime
    from engine.storage import open_store
    from engine.store.users import create_user, set_recording_consent
    from themes import load_theme

    monkeypatch.setenv("XSWARM_RECORDING__ENABLED", "true")
    settings = load_settings()
    runtime = Runtime(settings, model_spec="echo", bridge_port=0, supervisor_port=0, webhooks_port=0)
    runtime.start()
    try:
        assert runtime.db is not None
        user = create_user(runtime.db, name="Ann", phone="+15550100", email="ann@example.com")
        set_recording_consent(runtime.db, user.id, True)
        deadline = time.time() + 30
        while runtime.model_state != "ready" and time.time() < deadline:
            time.sleep(0.05)
        assert runtime.model_state == "ready"
        sink = LocalSink()

        async def begin() -> CallSession:
            session = CallSession("local-rec-1", sink, bus=runtime.bus, user_id=user.id)
            runtime.calls.admit(session)
            return session

        session = runtime.call_soon(begin()).result(5)
        for _ in range(20):  # 1.6 s of a 440 Hz tone into the "microphone"
            runtime.loop.call_soon_threadsafe(session.feed_microphone, tone(440))
            time.sleep(0.08)
        runtime.bus.publish(events.TranscriptAppended(call_id="local-rec-1", text="echo echo", speaker="ai"))

        async def end() -> None:
            runtime.calls.finish(session, "test over")

        runtime.call_soon(end()).result(5)
        store = open_store(settings)
        deadline = time.time() + 15
        while len(store.list("recordings/")) < 2 and time.time() < deadline:
            time.sleep(0.05)
        (wav_key,) = [i.key for i in store.list("recordings/") if i.key.endswith(".wav")]
        channels, rate, frames = read_wav(store.get_bytes(wav_key))
        assert channels == 2 and rate == SAMPLE_RATE and len(frames) >= 10 * FRAME
        assert np.abs(frames[:, 0]).max() > 0.3 * 32767  # the tone the caller "said"
        assert np.abs(frames[:, 1]).max() > 0.1 * 32767  # the echo model said it back
        record = json.loads(store.get_bytes(wav_key.replace(".wav", ".json")))
        texts = [line["text"] for line in record["transcript"]]
        greeting = load_theme(settings.ui.theme).persona.greeting  # the persona speaks first
        assert record["user_id"] == user.id and texts == [greeting, "echo echo"]
        # The runtime's storage service also took its daily backup at start.
        assert runtime.storage is not None
        deadline = time.time() + 30
        while not runtime.storage.rounds and time.time() < deadline:
            time.sleep(0.05)
        assert runtime.storage.last_backup is not None
        assert [k.key for k in store.list("backups/")] == [runtime.storage.last_backup.key]
    finally:
        runtime.stop()


@pytest.mark.slow
def test_twilio_call_through_the_bridge_is_recorded_to_s3(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A phone call as Twilio places it (the bridge's simulator, signed upgrade, one-time
    token) into the real Runtime with the echo model; the recording lands in the S3 bucket."""
    import socket

    from engine.audio import mulaw
    from engine.bridge.simulator import StreamTarget, stream_call
    from engine.config import load_settings
    from engine.runtime import Runtime
    from engine.storage import open_store
    from engine.store.users import create_user, set_recording_consent
    from engine.telephony.calltoken import mint

    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "auth-token-for-recording-test")
    monkeypatch.setenv("XSWARM_CALL_TOKEN_SECRET", "call-token-secret-for-recording-test")
    monkeypatch.setenv("XSWARM_RECORDING__ENABLED", "true")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = load_settings()
    runtime = Runtime(settings, model_spec="echo", bridge_port=port, supervisor_port=0, webhooks_port=0)
    runtime.start()
    try:
        assert runtime.db is not None
        user = create_user(runtime.db, name="Ada", phone="+15550100123", email="ada@example.com")
        set_recording_consent(runtime.db, user.id, True)
        deadline = time.time() + 30
        while runtime.model is None and time.time() < deadline:
            time.sleep(0.02)
        call_sid = "CA" + "5" * 32
        t = np.arange(8000 * 2) / 8000
        audio = mulaw.encode((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)).tobytes()
        target = StreamTarget(
            f"ws://127.0.0.1:{runtime.bridge_port}/twilio",
            {
                "token": mint("call-token-secret-for-recording-test", call_sid),
                "caller": "+15550100123",
                "user_id": user.id,
            },
        )
        report = asyncio.run(stream_call(target, audio, auth_token="auth-token-for-recording-test", call_sid=call_sid))
        assert report.chunks_received > 0
        store = open_store(settings)
        deadline = time.time() + 15
        while len(store.list("recordings/")) < 2 and time.time() < deadline:
            time.sleep(0.05)
        (wav_key,) = [i.key for i in store.list("recordings/") if i.key.endswith(".wav")]
        assert call_sid in wav_key
        channels, rate, frames = read_wav(store.get_bytes(wav_key))
        assert channels == 2 and rate == SAMPLE_RATE and len(frames) >= 20 * FRAME
        left = frames[:, 0].astype(float) / 32767
        right = frames[:, 1].astype(float) / 32767
        assert np.sqrt(np.mean(left**2)) > 0.1  # the caller's 220 Hz tone
        assert np.sqrt(np.mean(right**2)) > 0.05  # echoed back by the model
        spectrum = np.abs(np.fft.rfft(left))
        assert abs(np.fft.rfftfreq(len(left), 1 / SAMPLE_RATE)[spectrum.argmax()] - 220) < 5
        record = json.loads(store.get_bytes(wav_key.replace(".wav", ".json")))
        assert record["caller"] == "+15550100123" and record["user_id"] == user.id
    finally:
        runtime.stop()
