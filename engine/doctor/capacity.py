"""How many concurrent MOSHI 7B calls fit a GPU's memory, for each LM weights × KV cache choice.

Every figure comes from benchmark runs on a real GPU, distilled by
``benchmarks/capacity_table.py`` into ``capacity_measured.json`` beside this module (the
sources are listed in it). For a choice measured at context ``C0`` on that GPU:

    memory for B calls = weights + fixed + B × per_call(C)
    per_call(C)        = kv_per_call(C0) × C / C0 + (per_call(C0) − kv_per_call(C0))

The KV cache scales exactly with the context (it is allocated for the whole window); the rest
of a call's memory (Mimi state, the step's buffers) is kept as measured, which errs on the safe
side for shorter windows. A card also loses the memory its CUDA context holds outside
PyTorch's allocator (measured by the sweep; 0.5 GiB assumed until a sweep has run).

Memory is one limit; the other is the step time (one batched step must stay well under the
80 ms frame). Each choice carries the measured step p99 at the smallest measured batch that is
at least ``calls`` (on the GPU it was measured on), and a roofline for an RTX 4090: bytes read
per step (weights + every call's KV cache) / 1.008 TB/s. ``xswarm capacity`` prints the
table for any card size; ``xswarm doctor`` for this machine's GPU.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from engine.tick import FRAME_S

GIB = 1024**3
MIB = 1024**2
DATA = Path(__file__).with_name("capacity_measured.json")
WEIGHT_KINDS = ("bf16", "int8", "int4")
KV_KINDS = ("bf16", "int8", "fp8")
ASSUMED_OUTSIDE_ALLOCATOR_GIB = 0.5
BW_4090 = 1.008e12


@functools.lru_cache(maxsize=1)
def measured() -> dict[str, Any]:
    """The shipped measurements (read once)."""
    data: dict[str, Any] = json.loads(DATA.read_text(encoding="utf-8"))
    return data


def _choice(weights: str, kv: str) -> dict[str, Any] | None:
    for row in measured()["choices"]:
        if row["weights"] == weights and row["kv_cache"] == kv:
            return dict(row)
    return None


def outside_allocator_bytes() -> tuple[int, bool]:
    """(bytes a card loses to its CUDA context, whether that figure was measured)."""
    gib = measured().get("outside_allocator_gib")
    if gib is None:
        return int(ASSUMED_OUTSIDE_ALLOCATOR_GIB * GIB), False
    return int(gib * GIB), True


WEIGHTS_BYTES = {
    row["weights"]: int(row["weights_gib"] * GIB) for row in measured()["choices"] if row["kv_cache"] == "bf16"
}
"""Measured GPU bytes of the weights (LM + Mimi) per weights kind; bf16 is always measured."""


def per_call_bytes(row: dict[str, Any], context: int) -> int:
    kv = row["kv_mib_per_call"] * context / row["context"]
    return int((kv + row["per_call_mib"] - row["kv_mib_per_call"]) * MIB)


def calls_in(memory_bytes: int, weights: str, kv: str, context: int) -> int | None:
    """Calls that fit in ``memory_bytes`` of GPU memory (None: this choice was never measured)."""
    row = _choice(weights, kv)
    if row is None:
        return None
    outside, _ = outside_allocator_bytes()
    spare = memory_bytes - outside - int(row["weights_gib"] * GIB) - int(row["fixed_mib"] * MIB)
    return max(0, spare // per_call_bytes(row, context))


def _step_at(row: dict[str, Any], calls: int) -> tuple[int, float] | None:
    """(batch, p99) of the smallest measured batch that is at least ``calls``."""
    fits = sorted((b, ms) for b, ms in row["step_ms_p99"] if b >= max(1, calls))
    return (fits[0][0], fits[0][1]) if fits else None


def choices(memory_bytes: int, context: int) -> list[dict[str, Any]]:
    """One entry per weights × KV choice: calls that fit and what is known of the step."""
    out: list[dict[str, Any]] = []
    for weights in WEIGHT_KINDS:
        for kv in KV_KINDS:
            entry: dict[str, Any] = {
                "weights": weights,
                "kv_cache": kv,
                "context": context,
                "context_s": round(context * FRAME_S, 1),
            }
            row = _choice(weights, kv)
            if row is None:
                entry.update(
                    calls=None,
                    mem_per_call_mib=None,
                    measured=False,
                    note="not measured on a GPU yet (benchmarks/gpu_capacity.sh)",
                )
                out.append(entry)
                continue
            calls = calls_in(memory_bytes, weights, kv, context) or 0
            step = _step_at(row, calls)
            kv_bytes = row["kv_mib_per_call"] * MIB * context / row["context"]
            entry.update(
                calls=calls,
                mem_per_call_mib=round(per_call_bytes(row, context) / MIB, 1),
                weights_gib=row["weights_gib"],
                measured=True,
                measured_on=f"{row['gpu']}, context {row['context']}",
                step_ms_p99=step[1] if step else None,
                step_measured_at_batch=step[0] if step else None,
                roofline_4090_ms=round((row["weights_gib"] * GIB + calls * kv_bytes) / BW_4090 * 1e3, 1),
            )
            if row.get("top1_agree") is not None:
                entry.update(top1_agree=row["top1_agree"], logits_rel_err=row["logits_rel_err"])
            out.append(entry)
    return out


def estimate(
    *, vram_free: int | None, ram_available: int, context_steps: int, weights: str, kv_cache: str
) -> dict[str, Any]:
    """The ``capacity`` object of ``xswarm doctor --json``: this machine's GPU, every choice,
    and the configured one (``model.weights`` × ``model.kv_cache``) picked out."""
    outside, outside_measured = outside_allocator_bytes()
    table = choices(vram_free, context_steps) if vram_free is not None else []
    configured = next((c for c in table if c["weights"] == weights and c["kv_cache"] == kv_cache), None)
    if vram_free is None:
        limit = "no CUDA GPU (CPU inference is far slower than real time)"
        calls: int | None = 0
    elif configured is None or configured["calls"] is None:
        limit, calls = "this choice has not been measured on a GPU yet", None
    elif ram_available < WEIGHTS_BYTES.get(weights, WEIGHTS_BYTES["bf16"]):
        limit, calls = "host RAM below the weights' size (they are staged there to load)", 0
    else:
        limit, calls = "GPU memory", configured["calls"]
    return {
        "model": "moshi-7b",
        "context_steps": context_steps,
        "context_s": round(context_steps * FRAME_S, 1),
        "weights": weights,
        "kv_cache": kv_cache,
        "calls": calls,
        "limited_by": limit,
        "vram_free_bytes": vram_free,
        "ram_available_bytes": ram_available,
        "outside_allocator_bytes": outside,
        "outside_allocator_measured": outside_measured,
        "choices": table,
        "sources": measured()["sources"],
        "note": "memory from measured runs; step_ms_p99 was measured on the GPU named in measured_on",
    }
