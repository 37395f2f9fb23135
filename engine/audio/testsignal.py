"""A synthetic caller voice for simulated calls and load tests (no recordings in the repo).

Band-limited noise over the telephone band (300-3000 Hz) survives mu-law and the 8k<->24k
resamplers like speech does, and, unlike a tone, has one sharp cross-correlation peak, so an
echo's delay can be found again exactly.
"""

from __future__ import annotations

import numpy as np

from engine.audio import mulaw

RATE = 8000


def speech_band_ulaw(seconds: float, *, seed: int, level: float = 0.4, syllables_hz: float = 0.0) -> bytes:
    """``seconds`` of 8 kHz mu-law speech-band noise; ``syllables_hz`` > 0 adds a burst envelope."""
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[(freqs < 300) | (freqs > 3000)] = 0
    x = np.fft.irfft(spectrum, n)
    if syllables_hz > 0:
        x = x * (0.5 + 0.5 * np.sin(2 * np.pi * syllables_hz * np.arange(n) / RATE))
    return mulaw.encode((level * x / np.abs(x).max()).astype(np.float32)).tobytes()
