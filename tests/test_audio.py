"""Codec, resampler and framing properties (engine/audio)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.audio import mulaw
from engine.audio.framing import CHUNK_BYTES, FRAME_BYTES, InboundFrames, PcmFrames, split_frame
from engine.audio.resample import Downsampler, Upsampler, delay_seconds

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop")

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------ mu-law


def test_decode_table_matches_audioop_for_every_code() -> None:
    codes = bytes(range(256))
    expected = np.frombuffer(audioop.ulaw2lin(codes, 2), np.int16)
    assert np.array_equal(mulaw.decode_int16(codes), expected)


def test_encode_matches_audioop_for_every_int16() -> None:
    samples = np.arange(-32768, 32768, dtype=np.int16)
    expected = np.frombuffer(audioop.lin2ulaw(samples.tobytes(), 2), np.uint8)
    assert np.array_equal(mulaw.encode_int16(samples), expected)


@given(st.binary(min_size=0, max_size=2048))
def test_decode_bytes_bit_exact(codes: bytes) -> None:
    expected = np.frombuffer(audioop.ulaw2lin(codes, 2), np.int16)
    assert np.array_equal(mulaw.decode_int16(codes), expected)


@given(st.lists(st.integers(-32768, 32767), max_size=1024))
def test_encode_samples_bit_exact(values: list[int]) -> None:
    samples = np.asarray(values, np.int16)
    expected = np.frombuffer(audioop.lin2ulaw(samples.tobytes(), 2), np.uint8)
    assert np.array_equal(mulaw.encode_int16(samples), expected)


@given(st.binary(min_size=1, max_size=512))
def test_decode_then_encode_is_identity_except_negative_zero(codes: bytes) -> None:
    again = mulaw.encode(mulaw.decode(codes)).tobytes()
    # 0x7F (-0) decodes to 0 and re-encodes as 0xFF (+0); every other code survives.
    assert again == codes.replace(b"\x7f", b"\xff")


def test_float_encode_clips_instead_of_wrapping() -> None:
    loud = np.array([1.5, -1.5, 1.0, -1.0], np.float32)
    assert list(mulaw.encode(loud)) == [0x80, 0x00, 0x80, 0x00]
    assert mulaw.encode(np.zeros(3, np.float32)).tobytes() == b"\xff\xff\xff"


# --------------------------------------------------------------------------- resampling


def speech_band(n: int, rate: int = 8000, lo: float = 300, hi: float = 3000) -> np.ndarray:
    x = RNG.standard_normal(n)
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < lo) | (freqs > hi)] = 0
    y = np.fft.irfft(spectrum, n)
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2)))


def round_trip(x: np.ndarray, chunk: int = 160) -> np.ndarray:
    up, down = Upsampler(), Downsampler()
    hi = np.concatenate([up.process(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    return np.concatenate([down.process(hi[i : i + 1920]) for i in range(0, len(hi), 1920)])


def test_round_trip_snr_on_speech_band_and_measured_delay() -> None:
    x = speech_band(16000)
    y = round_trip(x)
    # find the delay by cross-correlation, then require a clean signal at that delay
    corr = np.correlate(y[:4000], x[:3900], mode="valid")
    delay = int(np.argmax(corr))
    up_s, down_s = delay_seconds()
    assert delay == round((up_s + down_s) * 8000)
    assert (up_s + down_s) * 1000 <= 5.0  # the added delay budget, both directions together
    assert snr_db(x[400 : 16000 - delay], y[400 + delay :]) > 50


def test_output_does_not_depend_on_chunking() -> None:
    """Click-free across chunk edges: streaming in odd chunks equals streaming in one go."""
    x = speech_band(8000)
    whole = Upsampler().process(x)
    up = Upsampler()
    sizes = [1, 7, 31, 32, 33, 160, 97]
    parts, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        parts.append(up.process(x[i : i + n]))
        i, k = i + n, k + 1
    assert np.allclose(np.concatenate(parts), whole, atol=1e-5)

    hi = whole
    down_whole = Downsampler().process(hi)
    down = Downsampler()
    chunks = [down.process(hi[j : j + 1920]) for j in range(0, len(hi), 1920)]
    assert np.allclose(np.concatenate(chunks), down_whole, atol=1e-5)


def test_no_clicks_at_frame_edges() -> None:
    """A continuous tone through 20 ms chunks has no jump at the chunk boundaries."""
    t = np.arange(8000) / 8000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    up = Upsampler()
    y = np.concatenate([up.process(x[i : i + 160]) for i in range(0, len(x), 160)])
    steady = y[480:]
    jumps = np.abs(np.diff(steady))
    max_slope = 0.5 * 2 * np.pi * 440 / 24000  # largest step of the ideal 24 kHz tone
    assert jumps.max() < max_slope * 1.1


@pytest.mark.parametrize("freq", [4600, 5000, 6000, 9000, 11000])
def test_downsampler_rejects_aliases(freq: int) -> None:
    t = np.arange(24000) / 24000
    x = (0.9 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    y = Downsampler().process(x)[200:]
    assert 20 * np.log10(np.abs(y).max() / 0.9) < -55


@pytest.mark.parametrize("freq", [300, 1000, 2000, 3000])
def test_passband_is_flat(freq: int) -> None:
    t = np.arange(24000) / 24000
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    y = Downsampler().process(x)[200:]
    assert abs(20 * np.log10(np.abs(y).max() / 0.5)) < 1.0


def test_batched_rows_keep_separate_state() -> None:
    """Per-call state: row 1 of a batch gives the same output as its own resampler."""
    a, b = speech_band(640), speech_band(640)
    batch = Upsampler(rows=3)
    out = [batch.process(np.stack([a[i : i + 160], b[i : i + 160], a[i : i + 160]])) for i in range(0, 640, 160)]
    solo = Upsampler()
    ref = np.concatenate([solo.process(b[i : i + 160]) for i in range(0, 640, 160)])
    assert np.allclose(np.concatenate([o[1] for o in out]), ref, atol=1e-6)
    batch.reset(1)
    assert not batch.state[1].any() and batch.state[0].any()


def test_downsampler_refuses_partial_groups() -> None:
    with pytest.raises(ValueError):
        Downsampler().process(np.zeros(100, np.float32))


# ------------------------------------------------------------------------------ framing


def test_split_frame() -> None:
    frame = bytes(range(256)) * 2 + bytes(128)
    chunks = split_frame(frame)
    assert [len(c) for c in chunks] == [CHUNK_BYTES] * 4 and b"".join(chunks) == frame


def test_inbound_first_frame_ends_on_newest_eligible_chunk() -> None:
    frames = InboundFrames(guard_s=0.004)
    for i in range(6):  # 6 chunks have arrived by the first tick
        frames.push(bytes([i]) * CHUNK_BYTES, at=0.02 * i)
    frame, completed = frames.pop(tick_at=0.1 + 0.005)
    assert frame == b"".join(bytes([i]) * CHUNK_BYTES for i in range(2, 6))
    assert completed == pytest.approx(0.1)


def test_inbound_short_start_is_padded_with_silence_in_front() -> None:
    frames = InboundFrames(guard_s=0.0)
    frames.push(b"\x01" * CHUNK_BYTES, at=0.0)
    frame, _ = frames.pop(tick_at=0.01)
    assert frame == b"\xff" * (FRAME_BYTES - CHUNK_BYTES) + b"\x01" * CHUNK_BYTES
    assert frames.late == 0


def test_inbound_late_chunk_is_concealed_and_the_margin_grows_then_relaxes() -> None:
    frames = InboundFrames(guard_s=0.002, max_depth=1, relax_after_ticks=5, trim_after_ticks=2)
    for i in range(4):
        frames.push(b"\x10" * CHUNK_BYTES, at=0.02 * i)
    assert frames.pop(0.07)[0] == b"\x10" * FRAME_BYTES
    for i in range(3):  # the next frame's 4th chunk misses the tick
        frames.push(b"\x20" * CHUNK_BYTES, at=0.08 + 0.02 * i)
    frame, completed = frames.pop(0.15)
    assert frame == b"\x20" * (3 * CHUNK_BYTES) + b"\xff" * CHUNK_BYTES and completed is None
    assert frames.late == 0 and frames.depth == 1  # late once the stream shows it went on
    frames.push(b"\x21" * CHUNK_BYTES, at=0.152)  # the straggler becomes 20 ms of margin
    assert frames.late == 1
    for i in range(4):
        frames.push(b"\x30" * CHUNK_BYTES, at=0.16 + 0.02 * i)
    frame, completed = frames.pop(0.23)
    assert frame == b"\x21" * CHUNK_BYTES + b"\x30" * (3 * CHUNK_BYTES)
    assert completed == pytest.approx(0.2)  # one chunk earlier than before: the margin
    tick = 0.23
    for _ in range(8):  # no more lateness: the margin is given back after relax_after_ticks
        tick += 0.08
        for i in range(4):
            frames.push(b"\x40" * CHUNK_BYTES, at=tick - 0.07 + 0.02 * i)
        assert frames.pop(tick)[0] is not None
    assert frames.depth == 0 and frames.late == 1
    assert frames.dropped_bytes == CHUNK_BYTES and frames.buffered == 0


def test_inbound_late_chunk_beyond_the_margin_is_discarded() -> None:
    frames = InboundFrames(guard_s=0.002, max_depth=0)
    for i in range(4):
        frames.push(b"\x10" * CHUNK_BYTES, at=0.02 * i)
    frames.pop(0.07)
    for i in range(3):
        frames.push(b"\x20" * CHUNK_BYTES, at=0.08 + 0.02 * i)
    frames.pop(0.15)
    frames.push(b"\x21" * CHUNK_BYTES, at=0.152)  # already concealed: a late packet is lost
    for i in range(4):
        frames.push(b"\x30" * CHUNK_BYTES, at=0.16 + 0.02 * i)
    frame, completed = frames.pop(0.23)
    assert frame == b"\x30" * FRAME_BYTES and completed == pytest.approx(0.22)  # phase unchanged
    assert frames.dropped_bytes == CHUNK_BYTES


def test_inbound_persistent_backlog_is_trimmed() -> None:
    frames = InboundFrames(guard_s=0.002, trim_after_ticks=3)
    t = 0.0
    for i in range(4):
        frames.push(b"\x10" * CHUNK_BYTES, at=t + 0.02 * i)
    frames.pop(0.07)
    frames.push(b"\x11" * CHUNK_BYTES, at=0.071)  # a caller clock running fast: one extra chunk
    tick = 0.07
    for _ in range(4):
        tick += 0.08
        for i in range(4):
            frames.push(b"\x12" * CHUNK_BYTES, at=tick - 0.07 + 0.02 * i)
        frame, _ = frames.pop(tick)
        assert frame is not None
    assert frames.dropped_bytes == CHUNK_BYTES and frames.buffered == 0 and frames.late == 0


def test_inbound_burst_after_a_stall_is_trimmed_at_once() -> None:
    frames = InboundFrames(guard_s=0.002, trim_after_ticks=50)
    for i in range(4):
        frames.push(b"\x10" * CHUNK_BYTES, at=0.02 * i)
    frames.pop(0.07)
    for i in range(12):  # 240 ms arrive at once after a stall (the ticks in between were concealed)
        frames.push(bytes([0x20 + i]) * CHUNK_BYTES, at=0.4)
    frame, completed = frames.pop(0.41)
    assert frame == b"".join(bytes([0x20 + i]) * CHUNK_BYTES for i in range(8, 12))  # the newest audio
    assert frames.buffered == 0 and frames.dropped_bytes == 8 * CHUNK_BYTES and completed == 0.4


def test_a_frame_cut_short_by_the_end_of_the_stream_is_not_late() -> None:
    """The caller hangs up two chunks into a frame and a tick fires before its ``stop``: the
    frame is concealed, but nothing came late; the stream ended."""
    frames = InboundFrames(guard_s=0.002)
    for i in range(4):
        frames.push(b"\x10" * CHUNK_BYTES, at=0.02 * i)
    frames.pop(0.07)
    for i in range(2):
        frames.push(b"\x20" * CHUNK_BYTES, at=0.08 + 0.02 * i)
    frame, completed = frames.pop(0.15)
    assert frame == b"\x20" * (2 * CHUNK_BYTES) + b"\xff" * (2 * CHUNK_BYTES) and completed is None
    assert frames.late == 0
    assert frames.pop(0.23) == (b"\xff" * FRAME_BYTES, None) and frames.late == 0  # nothing more came


def test_inbound_nothing_sent_is_not_late() -> None:
    frames = InboundFrames()
    assert frames.pop(1.0) == (None, None)
    assert frames.late == 0


def test_pcm_frames_accumulate_and_bound() -> None:
    frames = PcmFrames(max_frames=2)
    frames.push(np.ones(1000, np.float32))
    assert frames.pop() is None
    frames.push(np.full(1000, 2.0, np.float32))
    frame = frames.pop()
    assert frame is not None and frame.shape == (1920,) and frame[999] == 1 and frame[1000] == 2
    frames.push(np.zeros(10000, np.float32))
    assert len(frames) == 2 * 1920 and frames.dropped > 0
