"""Small formatting helpers shared by the panels (pure, unit-tested)."""

from __future__ import annotations

BLOCKS = " ▏▎▍▌▋▊▉█"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def bar(fraction: float, width: int) -> str:
    """A horizontal bar with eighth-block resolution, exactly ``width`` cells."""
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (BLOCKS[part] if part else "")
    return text.ljust(width)


def level_fraction(rms: float) -> float:
    """RMS (0..1) to a meter position on a 60 dB scale, so speech sits mid-meter, not at the floor."""
    if rms <= 1e-6:
        return 0.0
    import math

    return min(1.0, max(0.0, 1.0 + 20.0 * math.log10(rms) / 60.0))


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"
