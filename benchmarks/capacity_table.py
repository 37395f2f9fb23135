"""Distil GPU benchmark results into the capacity figures the package ships.

    python benchmarks/capacity_table.py benchmarks/results/gpu_engine_h200_synthetic7b.json \\
        benchmarks/results/gpu_capacity_h200_synthetic7b.json

Reads ``engine`` reports (``benchmarks/gpu_engine.sh``, one weights × KV choice per file) and
``capacity`` reports (``benchmarks/gpu_capacity.sh``, every choice), later files overriding
earlier ones for the same choice, and writes ``engine/doctor/capacity_measured.json``, which
``xswarm capacity`` and ``xswarm doctor`` read. For each choice it keeps:

* ``weights_gib``: GPU memory allocated for the weights (LM + Mimi);
* ``fixed_mib`` and ``per_call_mib``: a least-squares line through every run's peak memory
  above the weights, ``peak(B) = fixed + B × per_call`` (activations that do not grow with
  the batch land in ``fixed``);
* ``kv_mib_per_call``: the part of ``per_call`` that is KV cache at the measured context
  (allocated bytes; it scales exactly with the context, the rest of ``per_call`` does not);
* ``step_ms_p99``: ``[batch, p99]`` of every run on that GPU;
* ``cards``: the calls each emulated card held in the sweep, when there was one.

Only figures from runs go in; a choice without a run is simply absent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEST = ROOT / "engine" / "doctor" / "capacity_measured.json"
MIB = 2**20
GIB = 2**30


def kv_mib_per_call(kind: str, context: int) -> float:
    """KV cache of one 7B call as allocated (temporal transformer, K and V, all layers)."""
    from moshi.models import loaders

    from engine.models.kv_cache import bytes_per_element

    dim, heads, layers = (int(loaders._lm_kwargs[k]) for k in ("dim", "num_heads", "num_layers"))  # type: ignore[call-overload]
    return 2 * layers * dim * context * bytes_per_element(kind, dim // heads) / MIB


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed, per_call) in MiB through (batch, MiB above the weights), fixed clamped at 0."""
    batches = np.array([b for b, _ in points], dtype=float)
    used = np.array([m for _, m in points], dtype=float)
    if len(set(batches)) < 2:
        return 0.0, float(used.max() / batches.max())
    per_call, fixed = np.polyfit(batches, used, 1)
    if fixed < 0:
        return 0.0, float((used / batches).max())
    return float(fixed), float(per_call)


def from_engine(report: dict[str, Any]) -> dict[str, Any] | None:
    if report.get("device") != "cuda" or report.get("gpu_weights_gib") is None:
        return None
    weights_gib = report["gpu_weights_gib"]
    rows = [r for r in report["results"] if "error" not in r and "gpu_peak_gib" in r]
    points = [(r["batch"], (r["gpu_peak_gib"] - weights_gib) * GIB / MIB) for r in rows]
    kv = report.get("kv_cache", "bf16")
    return {
        "weights": report.get("weights", "bf16"),
        "kv_cache": kv,
        "gpu": report["device_name"],
        "torch": report["torch"],
        "context": report["context"],
        "weights_gib": weights_gib,
        "points": points,
        "kv_mib_per_call": kv_mib_per_call(kv, report["context"]),
        "step_ms_p99": [[r["batch"], r["step_ms_p99"]] for r in rows],
    }


def _runs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    runs = [choice["calibration"]]
    for card in choice.get("cards", {}).values():
        runs.extend(card.get("tries", []))
        runs.extend(v for k, v in card.items() if k.startswith("at_batch_"))
    return [r for r in runs if r.get("ok") and "mem_per_call_mib" in r]


def from_capacity(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for choice in report["choices"]:
        if "calibration" not in choice or report.get("device") != "cuda":
            continue
        runs = _runs(choice)
        if not runs:
            continue
        seen: dict[int, dict[str, Any]] = {}
        for r in runs:  # one point per batch: the run with the highest peak
            if r["batch"] not in seen or r["mem_per_call_mib"] > seen[r["batch"]]["mem_per_call_mib"]:
                seen[r["batch"]] = r
        out.append(
            {
                "weights": choice["weights"],
                "kv_cache": choice["kv_cache"],
                "gpu": report["device_name"],
                "torch": report["torch"],
                "context": report["context"],
                "weights_gib": choice["weights_allocated_gib"],
                "points": [(b, r["mem_per_call_mib"] * b) for b, r in sorted(seen.items())],
                "kv_mib_per_call": choice["kv_cache_mib_per_call"],
                "step_ms_p99": [[b, r["step_ms_p99"]] for b, r in sorted(seen.items())],
                "logits_rel_err": choice.get("logits_rel_err"),
                "top1_agree": choice.get("top1_agree"),
                "cards": {name: card.get("calls") for name, card in choice.get("cards", {}).items()},
                "outside_allocator_gib": report.get("outside_allocator_gib"),
            }
        )
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    table: dict[tuple[str, str], dict[str, Any]] = {}
    outside: float | None = None
    sources = []
    for name in argv:
        path = Path(name)
        report = json.loads(path.read_text(encoding="utf-8"))
        sources.append(str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path))
        if report.get("benchmark") == "engine":
            rows = [r for r in [from_engine(report)] if r is not None]
        elif report.get("benchmark") == "capacity":
            rows = from_capacity(report)
        else:
            raise SystemExit(f"{path}: not an engine or capacity benchmark report")
        for row in rows:
            outside = row.pop("outside_allocator_gib", None) or outside
            fixed, per_call = fit(row.pop("points"))
            row["fixed_mib"] = round(fixed, 1)
            row["per_call_mib"] = round(per_call, 1)
            row["kv_mib_per_call"] = round(row["kv_mib_per_call"], 2)
            table[(row["weights"], row["kv_cache"])] = row
    if ("bf16", "bf16") not in table:
        # xswarm doctor's RAM check and the README table start from the unquantized figures.
        raise SystemExit("no bf16 weights x bf16 KV run among the sources: add gpu_engine_*.json")
    data = {
        "what": "measured GPU memory and step time per MOSHI 7B weights x KV cache choice (synthetic:7b)",
        "written_by": "benchmarks/capacity_table.py",
        "sources": sources,
        "outside_allocator_gib": outside,
        "target_step_p99_ms": 60.0,
        "choices": sorted(table.values(), key=lambda r: (r["weights"], r["kv_cache"])),
    }
    DEST.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {DEST}: {len(table)} choices")
    if DEST == ROOT / "engine" / "doctor" / "capacity_measured.json":
        print(markdown())
    return 0


CARDS = [(12.0, "12 GB (3060)"), (24.0, "24 GB (4090)"), (79.6, "80 GB (H100)"), (139.8, "141 GB (H200)")]
"""Card memory in GiB, as the driver reports it."""


def markdown(context: int = 3000) -> str:
    """The README's calls-per-card table, from the shipped figures (``xswarm capacity``'s numbers)."""
    from engine.doctor import capacity

    capacity.measured.cache_clear()
    head = "| weights | KV cache | MiB per call | " + " | ".join(name for _, name in CARDS) + " |"
    lines = [head, "|" + "---|" * (3 + len(CARDS))]
    for weights in capacity.WEIGHT_KINDS:
        for kv in capacity.KV_KINDS:
            cells = []
            per_call = "not measured yet"
            for gib, _ in CARDS:
                row = next(
                    c
                    for c in capacity.choices(int(gib * capacity.GIB), context)
                    if (c["weights"], c["kv_cache"]) == (weights, kv)
                )
                if not row["measured"]:
                    cells.append("-")
                    continue
                per_call = f"{row['mem_per_call_mib']:.0f}"
                cell = str(row["calls"])
                if row["calls"] and row["step_ms_p99"] is not None:
                    cell += f" (p99 {row['step_ms_p99']:.0f} ms"
                    cell += f", 4090 ≥ {row['roofline_4090_ms']:.0f} ms)" if gib <= 24 else ")"
                cells.append(cell)
            lines.append(f"| {weights} | {kv} | {per_call} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
