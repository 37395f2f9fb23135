"""A real Chromium for the dashboard tests and benchmarks/web.py, driven by Playwright.

The browser is the machine's own Chromium (Debian's ``chromium`` package, installed by
``.ci/setup --dev``), never one Playwright downloads: set ``XSWARM_CHROMIUM`` to use another
binary. Its fake media devices stand in for a microphone (a WAV file we write) and accept the
permission prompt, so a takeover with the browser's microphone runs headless.
"""

from __future__ import annotations

import os
import shutil
import wave
from pathlib import Path

import numpy as np

_CHROMIUM_ENV = os.environ.get("XSWARM_CHROMIUM")
"""Read at import: the test suite's autouse fixture clears XSWARM_* variables."""
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MIC_RATE = 48_000


def chromium_path() -> str | None:
    if _CHROMIUM_ENV:
        return _CHROMIUM_ENV
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def launch_args(mic_wav: Path | None) -> list[str]:
    args = [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
    ]
    if mic_wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={mic_wav}")
    return args


def mic_signal(seconds: float = 4.0, seed: int = 7) -> np.ndarray:
    """What the fake microphone says: telephone-band noise under a random, speech-like envelope
    (bursts of 60..250 ms), at 48 kHz. Noise has a single sharp autocorrelation peak, so the
    caller's copy can be found by cross-correlation; the band (300..3400 Hz) survives the 8 kHz
    mu-law phone leg. Chromium loops the file, so the signal is periodic in ``seconds``."""
    rng = np.random.default_rng(seed)
    n = int(seconds * MIC_RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / MIC_RATE)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    noise = np.fft.irfft(spectrum, n)
    envelope = np.zeros(n)
    at = 0
    while at < n:
        length = int(rng.uniform(0.06, 0.25) * MIC_RATE)
        envelope[at : at + length] = rng.uniform(0.4, 1.0)
        at += length + int(rng.uniform(0.02, 0.08) * MIC_RATE)
    signal = noise * np.convolve(envelope, np.hanning(480) / np.hanning(480).sum(), mode="same")
    return (0.5 * signal / np.max(np.abs(signal))).astype(np.float32)


def write_wav(path: Path, pcm: np.ndarray, rate: int = MIC_RATE) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.rint(np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def best_match(received: np.ndarray, reference: np.ndarray) -> float:
    """Highest normalized cross-correlation of ``received`` against the looping ``reference``
    (same sample rate), over every lag of one period: about 1 for a faithful copy, near 0 for
    anything else."""
    n = len(received)
    period = len(reference)
    tiled = np.tile(reference, int(np.ceil((n + period) / period)) + 1)[: n + period]
    y = received - received.mean()
    size = 1 << int(np.ceil(np.log2(len(tiled) + n)))
    corr = np.fft.irfft(np.fft.rfft(tiled, size) * np.conj(np.fft.rfft(y, size)), size)[: period + 1]
    sums = np.concatenate(([0.0], np.cumsum(tiled.astype(np.float64) ** 2)))
    energy = (sums[n:] - sums[:-n])[: period + 1]  # sliding sum of squares, O(len) not O(len * n)
    norm = np.sqrt(energy) * np.linalg.norm(y) + 1e-12
    return float(np.max(corr / norm))


def strongest_match(received: np.ndarray, reference: np.ndarray, window: int = 4000) -> float:
    """``best_match`` of each ``window``-sample stretch of ``received`` (0.5 s at 8 kHz), the
    highest: a loaded machine may drop a frame here and there, and one clean half second
    already shows whose audio it is (noise of the same length scores under 0.1)."""
    starts = range(0, max(1, len(received) - window + 1), window // 2)
    return max(best_match(received[i : i + window], reference) for i in starts)
