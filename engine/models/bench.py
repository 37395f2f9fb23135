"""Engine benchmark: the full batched step (Mimi encode + LM step + Mimi decode) per batch size.

Shared by ``xswarm bench engine`` and ``benchmarks/engine.py``. It imports only torch, moshi,
torchao (for quantized weights) and ``engine.models`` (no settings, no CLI), so the GPU run
can carry just those wheels. The weights are built once; each batch size gets fresh streaming
state (KV caches sized ``batch × context``), a warm-up, then ``steps`` timed steps with every
slot live and fresh noise as caller audio. On CUDA the step ends with the output copied to
the host, so wall time includes the GPU work.

With ``weights`` or ``kv_cache`` other than bf16, the float model is built first, its logits
recorded as the reference (``engine.models.fidelity``), then it is quantized in place and
compared on the same inputs; every row carries the result (``logits_rel_err``, ``top1_agree``:
a numerical proxy with random weights). Each row also carries ``mem_per_call_mib``: on CUDA
the step's peak allocated memory above the weights, per call (KV cache, Mimi state and the
step's transient buffers); on the CPU the growth of the process RSS, per call.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.models.base import FRAME_SIZE, StepInput
from engine.tick import FRAME_S

FRAME_MS = FRAME_S * 1000


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def machine_facts(dev: Any) -> dict[str, Any]:
    """Device, driver and library versions, for every benchmark report."""
    import moshi
    import torch

    cuda = dev.type == "cuda"
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else _cpu_name(),
        "driver": _driver() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "moshi": moshi.__version__,
    }


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "mean": round(float(arr.mean()), 3),
        "max": round(float(arr.max()), 3),
    }


def _rss() -> int:
    """Resident set size, after handing freed heap pages back to the OS (glibc) so that one
    batch's freed buffers do not hide the next batch's growth."""
    import ctypes
    import ctypes.util

    import psutil

    libc_name = ctypes.util.find_library("c")
    if libc_name and platform.system() == "Linux":
        ctypes.CDLL(libc_name).malloc_trim(0)
    return int(psutil.Process(os.getpid()).memory_info().rss)


def kv_bytes(model: Any) -> int:
    """Bytes of the temporal transformer's KV caches as allocated (any kind)."""
    total = 0
    for module in model.parts.lm.transformer.modules():
        state = getattr(module, "_streaming_state", None)
        cache = getattr(state, "kv_cache", None)
        if cache is None:
            continue
        for name in ("cache", "data", "scales"):
            t = getattr(cache, name, None)
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def time_steps(model: Any, steps: int, controls: bool, rng: np.random.Generator) -> list[float]:
    B = model.slots
    frames = (rng.standard_normal((steps, B, FRAME_SIZE)) * 0.05).astype(np.float32)
    active = np.ones(B, bool)
    none = np.zeros(B, bool)
    takeover = np.arange(B) % 2 == 1
    times = []
    for i in range(steps):
        batch = StepInput(pcm=frames[i], active=active, admitted=none)
        if controls:
            # Half the slots under takeover, the other half whispered to: both hooks work
            # on every step.
            batch.takeover = takeover
            batch.operator_pcm = frames[i]
            if i % 8 == 0:
                batch.forced_text = {s: "hello thanks for calling" for s in range(0, B, 2)}
        model.step(batch)
        times.append(model.last_step_ms)
    return times


def run_engine_bench(
    spec: str,
    batches: list[int],
    steps: int,
    *,
    warmup: int = 12,
    device: str = "auto",
    dtype: str | None = None,
    context: int | None = None,
    controls: bool = False,
    threads: int | None = None,
    weights: str = "bf16",
    kv_cache: str = "bf16",
    fidelity_steps: int = 16,
    fidelity_batch: int = 4,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure ``spec`` (``synthetic:<size>``) at each batch size; return one JSON-able dict."""
    import torch

    from engine.models import fidelity
    from engine.models import kv_cache as kv
    from engine.models.moshi_torch import pick_device
    from engine.models.quantize import check_kind as check_weights
    from engine.models.quantize import config_for, quantize_lm, tensor_bytes
    from engine.models.synthetic import SyntheticMoshi, check_size

    family, _, size = spec.partition(":")
    if family != "synthetic":
        raise ValueError("the engine benchmark builds random-weight models: use synthetic:tiny|small|7b")
    check_size(size or "tiny")
    if not batches or any(b < 1 for b in batches) or steps < 1:
        raise ValueError("batches must be positive integers and steps at least 1")
    check_weights(weights)
    kv.check_kind(kv_cache)
    say = log or (lambda _msg: None)
    dev = pick_device(device)
    cuda = dev.type == "cuda"
    config_for(weights, dev)  # an impossible choice (int4 on a CPU) fails before the build

    def make(slots: int) -> SyntheticMoshi:
        return SyntheticMoshi(
            slots,
            size=size or "tiny",
            device=str(dev),
            dtype=dtype,
            context=context,
            seed=0,
            warmup_steps=warmup,
            kv_cache=kv_cache,
        )

    builder = make(batches[0])
    say(f"building {spec} on {dev}")
    builder.load()
    parts = builder.parts
    builder.close()
    del builder
    gc.collect()
    agreement: dict[str, Any] = {"logits_rel_err": 0.0, "top1_agree": 1.0, "top1_agree_tokens": 1.0}
    if weights != "bf16" or kv_cache != "bf16":
        fb = max(1, fidelity_batch)
        say(f"reference logits: unquantized weights and KV cache, batch {fb}, {fidelity_steps} steps")
        kv.install(parts.lm, "bf16")
        reference = fidelity.logits(parts.lm, fidelity_steps, fb)
        quantize_lm(parts.lm, weights)
        parts.facts["weights"] = weights
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        kv.install(parts.lm, kv_cache)
        say(f"{weights} weights, {kv_cache} KV cache: the same inputs")
        agreement = fidelity.compare(reference, fidelity.logits(parts.lm, fidelity_steps, fb, forced=reference))
        del reference
    weights_bytes = torch.cuda.memory_allocated(dev) if cuda else None
    model_bytes = tensor_bytes(parts.lm) + tensor_bytes(parts.mimi)

    results: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for b in batches:
        say(f"batch {b}: warm-up")
        model = None
        try:
            gc.collect()
            base = torch.cuda.memory_allocated(dev) if cuda else _rss()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            model = make(b)
            model.load(parts=parts)
            if threads:  # after load: an explicit choice beats the engine's CPU default
                torch.set_num_threads(threads)
            model.warmup()
            say(f"batch {b}: {steps} steps")
            times = time_steps(model, steps, False, rng)
            row: dict[str, Any] = {"batch": b}
            p = percentiles(times)
            row.update(
                step_ms_p50=p["p50"],
                step_ms_p99=p["p99"],
                step_ms_mean=p["mean"],
                step_ms_max=p["max"],
                per_call_ms=round(p["p50"] / b, 3),
                realtime_factor=round(p["p50"] / FRAME_MS, 3),
            )
            if controls:
                ctimes = time_steps(model, steps, True, rng)
                c = percentiles(ctimes)
                row.update(
                    controls_step_ms_p50=c["p50"],
                    controls_step_ms_p99=c["p99"],
                    controls_overhead_ms_p50=round(c["p50"] - p["p50"], 3),
                )
            used = (torch.cuda.max_memory_allocated(dev) if cuda else _rss()) - base
            row.update(
                mem_per_call_mib=round(used / b / 2**20, 1),
                kv_cache_mib_per_call=round(kv_bytes(model) / b / 2**20, 2),
                weights_gib=round(model_bytes / 2**30, 3),
                **agreement,
            )
            if cuda:
                alloc = torch.cuda.memory_allocated(dev)
                row.update(
                    gpu_mem_gib=round(alloc / 2**30, 3),
                    gpu_peak_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 3),
                    gpu_mem_per_call_mib=round((alloc - (weights_bytes or 0)) / b / 2**20, 1),
                )
            results.append(row)
        except torch.OutOfMemoryError:
            results.append({"batch": b, "error": "out of memory"})
            say(f"batch {b}: out of memory; stopping")
            break
        finally:
            if model is not None:
                model.close()
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    ok = [r for r in results if "error" not in r]
    under = [r["batch"] for r in ok if r["step_ms_p99"] < FRAME_MS]
    by_batch = {r["batch"]: r for r in ok}
    speedup = None
    if 1 in by_batch and 16 in by_batch:
        speedup = round(by_batch[1]["per_call_ms"] / by_batch[16]["per_call_ms"], 2)
    facts = parts.facts
    report: dict[str, Any] = {
        "benchmark": "engine",
        "model": spec,
        **machine_facts(dev),
        "dtype": str(parts.lm.dtype).removeprefix("torch."),
        "weights": weights,
        "kv_cache": kv_cache,
        "kv_attention": None
        if kv_cache == "bf16"
        else ("fused" if cuda and not kv.compile_disabled() else "dequantize"),
        "context": parts.lm.context,
        "threads": torch.get_num_threads(),
        "lm_params": facts.get("lm_params"),
        "steps": steps,
        "warmup_steps": warmup,
        "frame_ms": FRAME_MS,
        "what": "wall time of one full batched step: Mimi encode + LMGen.step + Mimi decode + host copies",
        "mem_per_call": (
            "peak GPU memory allocated above the weights during warm-up and timed steps, per call"
            if cuda
            else "growth of the process RSS over warm-up and timed steps, per call"
        ),
        "fidelity": {
            "reference": f"unquantized {str(parts.lm.dtype).removeprefix('torch.')} weights and KV cache, seed 0",
            "batch": max(1, fidelity_batch),
            "steps": fidelity_steps,
            "note": fidelity.PROXY_NOTE,
        },
        "results": results,
        "largest_batch_p99_under_80ms": max(under) if under else None,
        "per_call_speedup_b16_vs_b1": speedup,
    }
    if cuda and weights_bytes is not None:
        report["gpu_weights_gib"] = round(weights_bytes / 2**30, 3)
        report["gpu_total_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 2)
    return report
