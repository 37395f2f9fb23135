"""Calls per card: for each LM weights × KV cache choice, the largest batch that fits a card's
memory and keeps the step's p99 within the target (60 ms), measured on one big GPU.

Smaller cards are emulated with ``torch.cuda.set_per_process_memory_fraction``: the caching
allocator refuses to hold more than the card's usable memory (its size less
``--cuda-context-gib`` for the CUDA context and driver, which a real card spends outside
PyTorch's allocator). Step times are the big GPU's; beside each, a roofline estimate for an
RTX 4090 (bytes read per step / 1.008 TB/s) says what the card's bandwidth allows:

* ``roofline_4090_ms``: model bytes + every call's KV cache in its stored format, read once;
  what a fused attention kernel would move;
* ``roofline_4090_eager_ms``: plus what this implementation moves on top: for int8 weights the
  bf16 copy each weight-only matmul writes and reads, and for int8/fp8 KV on the fallback
  attention path the same for the dequantized ring (``engine.models.kv_cache``; the engine's
  CUDA path reads the codes directly). Each compact choice also times its calibration batch on
  that fallback path, for comparison.

The search per (choice, card): one calibration run at full memory (``--calibrate-batch``)
gives the peak memory per call and the step time; a byte-proportional model predicts the
largest batch for the card's memory and for the target, then runs at that batch confirm it
(out of memory: 10 % fewer; too slow: scaled down; fast with room left: one try larger).
Every figure in the output comes from a run; predictions only choose which batch to run.

Fidelity per choice: ``engine.models.fidelity`` against the unquantized model of the same seed
(a numerical proxy with random weights, not speech quality).

    python benchmarks/capacity.py --model synthetic:7b --out capacity.json

Writes the JSON after every choice, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.report import emit  # noqa: E402

GIB = 2**30
BW_4090 = 1.008e12
BW_H200 = 4.8e12
CARDS_GIB = {"12gb": 12.0, "24gb": 24.0}


class Sweep:
    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]) -> None:
        import torch

        from engine.models.moshi_torch import pick_device

        self.args = args
        self.say = log
        self.dev = pick_device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.size = args.model.partition(":")[2] or "tiny"
        self.total = torch.cuda.get_device_properties(self.dev).total_memory if self.cuda else None
        self.started = time.monotonic()
        self.rng = np.random.default_rng(0)
        self.weight_copy_bytes = 0
        """Per step: the bf16 copies int8 weight-only matmuls write and read (0 for bf16, int4)."""
        self.attention: str | None = None
        """The compact cache's attention path in the runs being timed: fused or dequantize."""

    def time_left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    @contextmanager
    def card(self, budget: int | None) -> Iterator[None]:
        """Cap the allocator at ``budget`` bytes (None: the whole GPU)."""
        import torch

        if not self.cuda or budget is None:
            yield
            return
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / (self.total or budget)), self.dev)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, self.dev)

    def build(self, weights: str) -> tuple[Any, Any]:
        """The float model (seed 0), its reference logits, then quantized to ``weights``."""
        from engine.models import fidelity, kv_cache
        from engine.models.quantize import quantize_lm
        from engine.models.synthetic import SyntheticMoshi

        builder = SyntheticMoshi(1, size=self.size, device=str(self.dev), context=self.args.context, seed=0)
        builder.load()
        parts = builder.parts
        builder.close()
        kv_cache.install(parts.lm, "bf16")
        reference = fidelity.logits(parts.lm, self.args.fidelity_steps, self.args.fidelity_batch)
        quantize_lm(parts.lm, weights)
        parts.facts["weights"] = weights
        self._free()
        return parts, reference

    def outside_allocator_gib(self) -> float:
        """GPU memory in use that PyTorch's allocator does not hold (CUDA context, cuBLAS
        workspaces, loaded kernels); on a dedicated GPU, what a card loses before any tensor."""
        import torch

        self._free()
        free, total = torch.cuda.mem_get_info(self.dev)
        return round((total - free - torch.cuda.memory_reserved(self.dev)) / GIB, 3)

    def _free(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def trial(self, parts: Any, batch: int, kv: str) -> dict[str, Any]:
        """One batch size: load streaming state, warm up, time ``--steps`` steps."""
        import torch

        from engine.models.bench import kv_bytes, percentiles, time_steps
        from engine.models.synthetic import SyntheticMoshi

        self._free()
        base = torch.cuda.memory_allocated(self.dev) if self.cuda else 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        row: dict[str, Any] = {"batch": batch}
        model = None
        t0 = time.monotonic()
        try:
            model = SyntheticMoshi(
                batch,
                size=self.size,
                device=str(self.dev),
                context=self.args.context,
                seed=0,
                warmup_steps=self.args.warmup,
                kv_cache=kv,
            )
            model.load(parts=parts)
            model.warmup()
            p = percentiles(time_steps(model, self.args.steps, False, self.rng))
            row.update(ok=True, step_ms_p50=p["p50"], step_ms_p99=p["p99"], step_ms_max=p["max"])
            row["kv_cache_mib_per_call"] = round(kv_bytes(model) / batch / 2**20, 2)
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(self.dev)
                row["mem_per_call_mib"] = round((peak - base) / batch / 2**20, 1)
                row["peak_gib"] = round(peak / GIB, 3)
        except Exception as exc:  # OOM may also surface as a failed CUDA graph capture
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
            row.update(ok=False, error="out of memory" if oom else f"{type(exc).__name__}: {str(exc)[:300]}")
            if not oom:
                row["fatal"] = True
        finally:
            if model is not None:
                model.close()
            del model
            self._free()
        row["wall_s"] = round(time.monotonic() - t0, 1)
        self.say(f"  batch {batch}: {row.get('step_ms_p99', row.get('error'))}")
        return row

    def roofline(self, row: dict[str, Any], model_bytes: int, kv: str) -> None:
        """Bytes read per step at this batch, and what they cost at 4090 / H200 bandwidth."""
        from engine.models.kv_cache import bytes_per_element

        if "kv_cache_mib_per_call" not in row:
            return
        kv_call = row["kv_cache_mib_per_call"] * 2**20
        minimal = model_bytes + row["batch"] * kv_call
        # What this implementation moves on top: int8 weight-only matmuls write and read a bf16
        # copy of each weight (2 + 2 bytes per weight); attention on the dequantized ring does
        # the same for every cached value.
        eager = minimal + self.weight_copy_bytes
        if kv != "bf16" and self.attention != "fused":
            elements = kv_call / bytes_per_element(kv, 128)
            eager += row["batch"] * elements * 4
        row["bytes_read_per_step_gib"] = round(minimal / GIB, 2)
        row["roofline_4090_ms"] = round(minimal / BW_4090 * 1e3, 1)
        row["roofline_4090_eager_ms"] = round(eager / BW_4090 * 1e3, 1)
        row["roofline_h200_eager_ms"] = round(eager / BW_H200 * 1e3, 1)

    def search(
        self, parts: Any, kv: str, budget: int | None, calib: dict[str, Any], weights_alloc: int, model_bytes: int
    ) -> dict[str, Any]:
        """Largest batch that fits ``budget`` with step p99 ≤ target, confirmed by runs."""
        args = self.args
        out: dict[str, Any] = {"tries": []}
        per_call = calib["mem_per_call_mib"] * 2**20 if self.cuda else None
        room = (budget if budget is not None else (self.total or 0)) - weights_alloc
        if self.cuda:
            b_mem = int(room * 0.97 / per_call) if per_call else 0
        else:
            b_mem = args.max_batch
        if b_mem < 1:
            out.update(calls=0, reason="the weights and one call do not fit")
            return out

        def predicted_ms(b: int) -> float:
            # Step time proportional to bytes read (weights + b × KV): conservative above
            # the calibration batch, corrected by the confirming runs.
            kv_call = calib["kv_cache_mib_per_call"] * 2**20
            return calib["step_ms_p99"] * (model_bytes + b * kv_call) / (model_bytes + calib["batch"] * kv_call)

        b = min(b_mem, args.max_batch)
        while b > 1 and predicted_ms(b) > args.target_ms:
            b = int(b * 0.9)
        best: dict[str, Any] | None = None
        tried_larger = False
        with self.card(budget):
            for _ in range(args.max_tries):
                if self.time_left() < 15 or b < 1:
                    out["note"] = "stopped early: time budget"
                    break
                row = self.trial(parts, b, kv)
                self.roofline(row, model_bytes, kv)
                out["tries"].append(row)
                if row.get("fatal"):
                    break
                if not row["ok"]:
                    if best is not None:
                        break
                    b = b - 1 if b < 10 else int(b * 0.9)
                    continue
                if row["step_ms_p99"] > args.target_ms:
                    if best is not None:
                        break
                    b = max(1, min(b - 1, int(b * args.target_ms / row["step_ms_p99"])))
                    continue
                best = row
                larger = min(b_mem, args.max_batch, int(b * args.target_ms / row["step_ms_p99"] * 0.97))
                if tried_larger or larger <= b:
                    break
                tried_larger = True
                b = larger
        out["calls"] = best["batch"] if best else 0
        if best:
            out["result"] = best
        return out

    def choice(self, parts: Any, reference: Any, weights: str, kv: str) -> dict[str, Any]:
        import torch

        from engine.models import fidelity, kv_cache
        from engine.models.quantize import tensor_bytes

        args = self.args
        self.say(f"{weights} weights, {kv} KV cache")
        kv_cache.install(parts.lm, kv)
        test = fidelity.logits(parts.lm, args.fidelity_steps, args.fidelity_batch, forced=reference)
        rec: dict[str, Any] = {"weights": weights, "kv_cache": kv, **fidelity.compare(reference, test)}
        model_bytes = tensor_bytes(parts.lm) + tensor_bytes(parts.mimi)
        self.weight_copy_bytes = 4 * sum(
            m.weight.numel()
            for m in parts.lm.modules()
            if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ == "Int8Tensor"
        )
        from engine.models.kv_cache import compile_disabled

        fused = kv != "bf16" and self.cuda and not compile_disabled()
        self.attention = None if kv == "bf16" else ("fused" if fused else "dequantize")
        weights_alloc = torch.cuda.memory_allocated(self.dev) if self.cuda else model_bytes
        rec["weights_gib"] = round(model_bytes / GIB, 3)
        rec["weights_allocated_gib"] = round(weights_alloc / GIB, 3)
        calib = self.trial(parts, args.calibrate_batch, kv)
        self.roofline(calib, model_bytes, kv)
        rec["calibration"] = calib
        rec["attention"] = self.attention
        if self.attention == "fused" and calib["ok"]:
            # The same batch with attention on the dequantized ring, for comparison.
            from engine.models.kv_cache import CompactKVAttention

            CompactKVAttention.fused = False
            self.attention = "dequantize"
            try:
                plain = self.trial(parts, args.calibrate_batch, kv)
                self.roofline(plain, model_bytes, kv)
            finally:
                CompactKVAttention.fused = None
                self.attention = "fused"
            rec["calibration_dequantized_attention"] = plain
        if not calib["ok"]:
            rec["error"] = "calibration batch did not run"
            return rec
        rec["mem_per_call_mib"] = calib.get("mem_per_call_mib")
        rec["kv_cache_mib_per_call"] = calib["kv_cache_mib_per_call"]
        cards: dict[str, Any] = {}
        for name, gib in CARDS_GIB.items():
            usable = int((gib - args.cuda_context_gib) * GIB)
            if self.cuda and usable <= weights_alloc:
                cards[name] = {"usable_gib": round(usable / GIB, 2), "calls": 0, "reason": "the weights do not fit"}
                continue
            self.say(f" {name} card")
            found = self.search(parts, kv, usable if self.cuda else None, calib, weights_alloc, model_bytes)
            cards[name] = {"usable_gib": round(usable / GIB, 2), **found}
        self.say(" whole GPU")
        whole = self.search(parts, kv, None, calib, weights_alloc, model_bytes)
        if whole["calls"] < args.big_batch and self.time_left() > 30:
            with self.card(None):
                row = self.trial(parts, args.big_batch, kv)
            self.roofline(row, model_bytes, kv)
            whole[f"at_batch_{args.big_batch}"] = row
        cards["whole_gpu"] = whole
        rec["cards"] = cards
        return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:7b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default="int8,int4,bf16", help="comma-separated, in run order")
    ap.add_argument("--kv-cache", default="int8,fp8,bf16", help="comma-separated, in run order")
    ap.add_argument("--context", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--target-ms", type=float, default=60.0, help="step p99 limit")
    ap.add_argument("--calibrate-batch", type=int, default=32)
    ap.add_argument("--big-batch", type=int, default=128, help="always run the whole GPU at this batch too")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-tries", type=int, default=4)
    ap.add_argument("--cuda-context-gib", type=float, default=0.5, help="card memory outside the allocator")
    ap.add_argument("--fidelity-steps", type=int, default=16)
    ap.add_argument("--fidelity-batch", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting runs after this long")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from engine.models.bench import machine_facts
    from engine.models.fidelity import PROXY_NOTE

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    sweep = Sweep(args, say)
    report: dict[str, Any] = {
        "benchmark": "capacity",
        "model": args.model,
        **machine_facts(sweep.dev),
        "gpu_total_gib": round(sweep.total / GIB, 2) if sweep.total else None,
        "context": args.context,
        "target_step_p99_ms": args.target_ms,
        "steps_per_run": args.steps,
        "warmup_steps": args.warmup,
        "cards": {
            name: f"{gib:g} GB card: allocator capped at {gib - args.cuda_context_gib:g} GiB"
            for name, gib in CARDS_GIB.items()
        },
        "emulated": sweep.cuda,
        "mem_per_call": "peak allocated memory above the weights over warm-up and timed steps, per call",
        "roofline": (
            "bytes read per step / bandwidth: 4090 1.008 TB/s, H200 4.8 TB/s; *_eager adds the dequantized KV copy"
        ),
        "fidelity_note": PROXY_NOTE,
        "choices": [],
    }
    for weights in [w for w in args.weights.split(",") if w]:
        if sweep.time_left() < 30:
            report["choices"].append({"weights": weights, "skipped": "time budget"})
            continue
        say(f"building {args.model} ({weights})")
        t0 = time.monotonic()
        try:
            parts, reference = sweep.build(weights)
        except Exception as exc:  # a failed choice is a finding; the others still run
            report["choices"].append({"weights": weights, "error": f"{type(exc).__name__}: {exc}"})
            sweep._free()
            continue
        build_s = round(time.monotonic() - t0, 1)
        if sweep.cuda and "outside_allocator_gib" not in report:
            report["outside_allocator_gib"] = sweep.outside_allocator_gib()
        for kv in [k for k in args.kv_cache.split(",") if k]:
            if sweep.time_left() < 30:
                report["choices"].append({"weights": weights, "kv_cache": kv, "skipped": "time budget"})
                continue
            try:
                rec = sweep.choice(parts, reference, weights, kv)
            except Exception as exc:
                # Most likely torch.compile (moshi compiles its gating kernel, which sees the
                # quantized weights): measure the same choice without it, and say so.
                from moshi.utils.compile import no_compile

                say(f"failed ({type(exc).__name__}: {exc}); again without torch.compile")
                try:
                    with no_compile():
                        rec = sweep.choice(parts, reference, weights, kv)
                    rec.update(torch_compile=False, compile_error=f"{type(exc).__name__}: {str(exc)[:300]}")
                except Exception as exc2:
                    rec = {"weights": weights, "kv_cache": kv, "error": f"{type(exc2).__name__}: {str(exc2)[:300]}"}
            rec["build_s"] = build_s
            report["choices"].append(rec)
            report["elapsed_s"] = round(time.monotonic() - sweep.started, 1)
            if args.out:
                emit_quiet(report, args.out)
        del parts, reference
        sweep._free()
    report["elapsed_s"] = round(time.monotonic() - sweep.started, 1)
    emit(report, args.out)
    return 0


def emit_quiet(report: dict[str, Any], path: Path) -> None:
    """Write the report so far (no stdout), for runs cut short."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
