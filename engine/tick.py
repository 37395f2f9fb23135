"""The one frame every part shares: 80 ms of 24 kHz audio, one model step, one scheduler tick.

Imports nothing, so the console (which must paint before numpy or torch load) can use it.
"""

SAMPLE_RATE = 24_000
FRAME_SIZE = 1920
"""80 ms at 24 kHz: one Mimi frame."""
FRAME_S = FRAME_SIZE / SAMPLE_RATE
"""One tick: the budget every batched model step, with its gathering and DSP, must fit in."""
