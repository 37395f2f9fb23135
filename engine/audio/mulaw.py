"""G.711 mu-law with numpy lookup tables, bit-exact with CPython's ``audioop``.

Why tables: one gather per frame (``table[codes]``) is the cheapest transcoding there is, and
it vectorises across every call of a tick at once. Both tables are computed here from the
G.711 definition exactly as ``audioop`` implements it (the encoder drops the two low bits of
the 16-bit sample first, then clips at 8159 and biases by 33), so the bytes we send are the
bytes ``audioop.lin2ulaw`` would send; ``audioop`` itself is gone in Python 3.13.
"""

from __future__ import annotations

import numpy as np

SILENCE = 0xFF
"""Mu-law code of digital silence (not 0x00, which is the loudest negative sample)."""


def _decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((codes & 0x0F) << 3) + 0x84) << ((codes & 0x70) >> 4)
    return np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _encode_table() -> np.ndarray:
    """Code for every int16 sample, indexed by the sample's uint16 bit pattern."""
    samples = np.arange(65536, dtype=np.int32)
    samples = np.where(samples >= 32768, samples - 65536, samples) >> 2  # audioop's 14-bit input
    negative = samples < 0
    magnitude = np.minimum(np.abs(samples), 8159) + 33
    segment = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), magnitude)
    code = (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)  # past the last segment: the largest code
    mask = np.where(negative, 0x7F, 0xFF)
    return (code ^ mask).astype(np.uint8)


DECODE_INT16 = _decode_table()
DECODE_FLOAT = (DECODE_INT16.astype(np.float32) / 32768.0).astype(np.float32)
ENCODE_UINT16 = _encode_table()


def decode(codes: bytes | bytearray | np.ndarray) -> np.ndarray:
    """Mu-law bytes (or a uint8 array of any shape) -> float32 samples in -1..1."""
    if not isinstance(codes, np.ndarray):
        codes = np.frombuffer(codes, dtype=np.uint8)
    return DECODE_FLOAT[codes]


def decode_int16(codes: bytes | bytearray | np.ndarray) -> np.ndarray:
    if not isinstance(codes, np.ndarray):
        codes = np.frombuffer(codes, dtype=np.uint8)
    return DECODE_INT16[codes]


def encode_int16(samples: np.ndarray) -> np.ndarray:
    """int16 samples (any shape) -> uint8 mu-law codes of the same shape."""
    return ENCODE_UINT16[np.asarray(samples, dtype=np.int16).view(np.uint16)]


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float -1..1 -> int16 with rounding and clipping (out-of-range model output must not wrap)."""
    scaled = np.rint(np.asarray(samples, dtype=np.float32) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def encode(samples: np.ndarray) -> np.ndarray:
    """float32 samples in -1..1 (any shape) -> uint8 mu-law codes."""
    return encode_int16(float_to_int16(samples))
