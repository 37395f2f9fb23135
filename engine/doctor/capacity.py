"""How many concurrent MOSHI 7B calls fit in this machine's memory.

Figures from the MOSHI reference (ref-moshi.md §9): weights 7.688 B parameters = 14.3 GiB in
bf16, ≈8.17 GB as int8; the KV cache costs 2 (K, V) × 32 layers × 4096 × 2 bytes = 512 KiB per
step of attention window per call; ~1 GB stays reserved for the CUDA context and activations.
Memory is one limit; compute (one batched step under 80 ms) is the other, which only a
benchmark on the card can tell, so this says "fits", not "runs in real time".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
WEIGHTS_BYTES = {"bf16": int(14.3 * GIB), "int8": int(8.17e9)}
KV_BYTES_PER_STEP = 2 * 32 * 4096 * 2
"""512 KiB: one step of K and V, all 32 layers, 4096 wide, bf16."""
RESERVE_BYTES = int(1e9)
STEP_S = 0.08


@dataclass(frozen=True)
class Budget:
    dtype: str
    weights_bytes: int
    kv_bytes_per_call: int
    calls_by_vram: int | None
    """None when there is no CUDA GPU to fit."""
    calls_by_ram: int
    """What host RAM would hold if the model ran on the CPU (not in real time)."""
    calls: int
    """The estimate: calls that fit on the GPU (0 without one: CPU is far slower than real time)."""
    limited_by: str


def calls_in(memory_bytes: int, dtype: str, context_steps: int) -> int:
    """Calls whose KV cache fits beside the weights and the reserve (never negative)."""
    spare = memory_bytes - WEIGHTS_BYTES[dtype] - RESERVE_BYTES
    return max(0, spare // (KV_BYTES_PER_STEP * context_steps))


def estimate(*, vram_free: int | None, ram_available: int, context_steps: int) -> dict[str, Any]:
    """The ``capacity`` object of ``xswarm doctor --json``."""
    budgets = {}
    for dtype in WEIGHTS_BYTES:
        by_vram = calls_in(vram_free, dtype, context_steps) if vram_free is not None else None
        by_ram = calls_in(ram_available, dtype, context_steps)
        if by_vram is None:
            calls, limit = 0, "no CUDA GPU (CPU inference is far slower than real time)"
        elif ram_available < WEIGHTS_BYTES[dtype]:
            calls, limit = 0, "host RAM below the weights' size (they are staged there to load)"
        else:
            calls, limit = by_vram, "GPU memory"
        budgets[dtype] = Budget(
            dtype, WEIGHTS_BYTES[dtype], KV_BYTES_PER_STEP * context_steps, by_vram, by_ram, calls, limit
        )
    return {
        "model": "moshi-7b",
        "context_steps": context_steps,
        "context_s": round(context_steps * STEP_S, 1),
        "kv_bytes_per_call": KV_BYTES_PER_STEP * context_steps,
        "reserve_bytes": RESERVE_BYTES,
        "vram_free_bytes": vram_free,
        "ram_available_bytes": ram_available,
        **{dtype: budget.__dict__ for dtype, budget in budgets.items()},
        "note": "memory only; whether one batched step stays under 80 ms is measured by benchmarks",
    }
