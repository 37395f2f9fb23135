"""``xswarm doctor [--json]``: check this machine and estimate its call capacity."""

from __future__ import annotations

import json

import typer

from xswarm_tui.commands._common import load
from xswarm_tui.commands.capacity import render_choices

_MARK = {"pass": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def register(app: typer.Typer) -> None:
    app.command()(doctor)


def doctor(
    as_json: bool = typer.Option(False, "--json", help="One JSON object: checks and capacity."),
    network: bool = typer.Option(
        False,
        "--network",
        help="Also resolve and TLS-handshake each configured provider (short timeouts; no credentials sent).",
    ),
) -> None:
    """Check this machine against xswarm's needs. Exit 0 all pass, 1 warnings, 2 failures."""
    from engine.doctor import run

    report = run(load(), network=network)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        raise typer.Exit(report.exit_code)
    width = max(len(c.name) for c in report.checks)
    for check in report.checks:
        typer.echo(f"{_MARK[check.status]}  {check.name:<{width}}  {check.detail}")
        if check.status in ("warn", "fail") and check.fix:
            typer.echo(f"      {'':<{width}}  fix: {check.fix}")
    cap = report.capacity
    typer.echo("")
    where = cap["gpu"] or "no CUDA GPU"
    typer.echo(
        f"Capacity, MOSHI 7B, {where}: model.context = {cap['context_steps']} steps, so each call's "
        f"model remembers the last {cap['context_s']:g} s of the conversation"
    )
    typer.echo(
        f"  configured ({cap['weights']} weights, {cap['kv_cache']} KV cache): "
        f"{cap['calls'] if cap['calls'] is not None else 'unknown'} calls (limited by {cap['limited_by']})"
    )
    if cap["choices"]:
        typer.echo("  other choices (`xswarm capacity` for any card):")
        typer.echo(render_choices(cap["choices"], indent="    "))
    typer.echo(f"  ({cap['note']})")
    raise typer.Exit(report.exit_code)
