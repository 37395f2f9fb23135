"""``xswarm capacity``: calls per GPU for each LM weights × KV cache choice, from measured figures.

The arithmetic and the measurements live in ``engine.doctor.capacity`` (no torch import);
``xswarm doctor`` prints the same table for this machine's GPU.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, fail, load


def register(app: typer.Typer) -> None:
    app.command("capacity")(capacity)


def render_choices(rows: list[dict[str, Any]], indent: str = "") -> str:
    """The choices as an aligned text table."""
    lines = [f"{indent}{'weights':<8}{'KV':<6}{'calls':>6}{'MiB/call':>10}{'step p99':>18}{'4090 roofline':>15}"]
    for c in rows:
        if not c["measured"]:
            lines.append(f"{indent}{c['weights']:<8}{c['kv_cache']:<6}{'-':>6}{'-':>10}  {c['note']}")
            continue
        step = f"{c['step_ms_p99']:.1f} ms @B={c['step_measured_at_batch']}" if c["step_ms_p99"] is not None else "-"
        lines.append(
            f"{indent}{c['weights']:<8}{c['kv_cache']:<6}{c['calls']:>6}{c['mem_per_call_mib']:>10.0f}"
            f"{step:>18}{c['roofline_4090_ms']:>12.1f} ms"
        )
    return "\n".join(lines)


def capacity(
    gpu_memory_gib: float = typer.Option(
        None, "--gpu-memory-gib", help="The card's memory in GiB (default: this machine's first CUDA GPU)."
    ),
    context: int = typer.Option(
        None, "--context", help="Attention window in 80 ms steps, 50..3000 (default: model.context)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of choices."),
) -> None:
    """Calls that fit a GPU for each weights x KV cache choice, from measured runs."""
    from engine.doctor import capacity as cap
    from engine.tick import FRAME_S

    if gpu_memory_gib is not None and not 1 <= gpu_memory_gib <= 4096:
        fail("--gpu-memory-gib must be between 1 and 4096", EXIT_BAD_INPUT)
    if context is not None and not 50 <= context <= 3000:
        fail("--context must be between 50 and 3000 steps (3000 = 240 s, what MOSHI was trained with)", EXIT_BAD_INPUT)
    if context is None:
        context = load().model.context
    if gpu_memory_gib is None:
        from engine.telemetry import gpu

        found = gpu.probe().gpus
        if not found:
            fail("no CUDA GPU found here: pass --gpu-memory-gib N for the card you have in mind", EXIT_BAD_INPUT)
        memory = found[0].memory_total
        where = f"{found[0].name} ({memory / cap.GIB:.1f} GiB)"
    else:
        memory = int(gpu_memory_gib * cap.GIB)
        where = f"a {gpu_memory_gib:g} GiB GPU"
    rows = cap.choices(memory, context)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    _, outside_measured = cap.outside_allocator_bytes()
    typer.echo(
        f"MOSHI 7B on {where}, context {context} steps: each call's model remembers the last "
        f"{context * FRAME_S:g} s of the conversation"
    )
    typer.echo(render_choices(rows))
    typer.echo(
        "step p99: measured on the GPU in the sources (not this card); 4090 roofline: bytes read per step "
        "/ 1.008 TB/s. Fidelity figures, where shown in --json, come from random weights: a numerical proxy."
    )
    if not outside_measured:
        typer.echo(
            f"(the CUDA context is assumed to take {cap.ASSUMED_OUTSIDE_ALLOCATOR_GIB} GiB until a sweep measures it)"
        )
