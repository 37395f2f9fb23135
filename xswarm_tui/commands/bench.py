"""`xswarm bench engine`: time the full batched model step per batch size.

Prints one JSON object with ``--json`` (progress goes to stderr), else a table. The
measurement itself lives in ``engine.models.bench`` and imports torch only when it runs.
"""

from __future__ import annotations

import json

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, fail

app = typer.Typer(help="Benchmarks that print figures (JSON with --json).", no_args_is_help=True)


def _batches(text: str) -> list[int]:
    try:
        out = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"--batch must be comma-separated integers, got {text!r}", EXIT_BAD_INPUT)
    if not out or any(b < 1 or b > 1024 for b in out):
        fail("--batch sizes must be between 1 and 1024", EXIT_BAD_INPUT)
    return out


@app.command("engine")
def engine(
    model: str = typer.Option("synthetic:tiny", help="synthetic:tiny | synthetic:small | synthetic:7b"),
    batch: str = typer.Option("1,4,16", help="comma-separated batch sizes"),
    steps: int = typer.Option(50, min=1, max=100_000, help="timed steps per batch size"),
    warmup: int = typer.Option(12, min=0, max=1000, help="untimed steps first"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option(None, help="bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)"),
    context: int = typer.Option(None, min=1, max=3000, help="attention window in 80 ms steps (default 3000)"),
    threads: int = typer.Option(None, min=1, help="torch CPU threads"),
    controls: bool = typer.Option(False, help="also time steps with takeover and whisper active"),
    weights: str = typer.Option("bf16", help="LM weights: bf16 | int8 | int4 (int4: CUDA only)"),
    kv_cache: str = typer.Option("bf16", "--kv-cache", help="KV cache storage: bf16 | int8 | fp8"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Full step per batch: Mimi encode + LM step + Mimi decode, after a warm-up."""
    sizes = _batches(batch)
    if not model.startswith("synthetic:"):
        fail(
            "the engine benchmark uses random weights: pick synthetic:tiny, synthetic:small or synthetic:7b",
            EXIT_BAD_INPUT,
        )
    if dtype is not None and dtype not in ("bf16", "fp32"):
        fail("--dtype must be bf16 or fp32", EXIT_BAD_INPUT)
    if weights not in ("bf16", "int8", "int4"):
        fail("--weights must be bf16, int8 or int4", EXIT_BAD_INPUT)
    if kv_cache not in ("bf16", "int8", "fp8"):
        fail("--kv-cache must be bf16, int8 or fp8", EXIT_BAD_INPUT)
    from engine.models.bench import run_engine_bench

    try:
        report = run_engine_bench(
            model,
            sizes,
            steps,
            warmup=warmup,
            device=device,
            dtype=dtype,
            context=context,
            controls=controls,
            threads=threads,
            weights=weights,
            kv_cache=kv_cache,
            log=lambda msg: typer.echo(msg, err=True),
        )
    except (ValueError, RuntimeError) as exc:
        fail(str(exc), EXIT_BAD_INPUT if isinstance(exc, ValueError) else 1)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(
        f"{report['model']} on {report['device_name']} ({report['device']}, {report['dtype']}, "
        f"weights {report['weights']}, KV cache {report['kv_cache']}, "
        f"torch {report['torch']}, context {report['context']})"
    )
    typer.echo(
        f"{'batch':>6} {'p50 ms':>9} {'p99 ms':>9} {'per call ms':>12} {'MiB/call':>9} {'rel err':>8} {'top1':>6}"
    )
    for row in report["results"]:
        if "error" in row:
            typer.echo(f"{row['batch']:>6} {row['error']}")
            continue
        typer.echo(
            f"{row['batch']:>6} {row['step_ms_p50']:>9.1f} {row['step_ms_p99']:>9.1f} {row['per_call_ms']:>12.2f}"
            f" {row['mem_per_call_mib']:>9.1f} {row['logits_rel_err']:>8.4f} {row['top1_agree']:>6.3f}"
        )
    typer.echo(f"largest batch with p99 < 80 ms: {report['largest_batch_p99_under_80ms']}")
    typer.echo(f"MiB/call: {report['mem_per_call']}")
    typer.echo(f"rel err, top1: {report['fidelity']['note']}")
