"""Engine benchmark as a plain script: the same measurement as `xswarm bench engine`.

It needs only torch, moshi and the repository's `engine` package on the path (no settings,
no CLI deps), so `benchmarks/gpu_engine.sh` can run it on a bare GPU machine:

    python benchmarks/engine.py --model synthetic:tiny --batch 1,4,16 --steps 50

Prints ONE JSON object on stdout (progress goes to stderr); `--out FILE` also writes it there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import emit  # noqa: E402
from engine.models.bench import run_engine_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--context", type=int, default=None, help="attention window in steps (default 3000)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weights", default="bf16", choices=["bf16", "int8", "int4"], help="LM weights")
    ap.add_argument("--kv-cache", default="bf16", choices=["bf16", "int8", "fp8"], help="KV cache storage")
    ap.add_argument("--controls", action="store_true", help="also time steps with takeover + whisper active")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    report = run_engine_bench(
        args.model,
        batches,
        args.steps,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        context=args.context,
        controls=args.controls,
        threads=args.threads,
        weights=args.weights,
        kv_cache=args.kv_cache,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
