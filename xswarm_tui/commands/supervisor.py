"""``xswarm supervisor token [--monitor]``: print a supervisor token, only when asked.

Tokens come from settings (``XSWARM_SUPERVISOR_TOKEN`` / ``XSWARM_SUPERVISOR_MONITOR_TOKEN``)
or, when unset, from ``<config>/supervisor-tokens.json`` (0600), created here or at the first
``xswarm serve``. The token goes to stdout alone so it can be piped:
``xswarm attach ws://host:9999 --token "$(xswarm supervisor token)"``.
"""

from __future__ import annotations

from typing import Literal

import typer

from xswarm_tui.commands._common import fail, load

app = typer.Typer(help="Supervisor socket (:9999) tokens.", no_args_is_help=True)


@app.command()
def token(
    monitor: bool = typer.Option(False, "--monitor", help="The read-only (monitor) token instead of the operator one."),
    where: bool = typer.Option(False, "--where", help="Print where the token is kept instead of the token."),
) -> None:
    """Print the operator token (may act on calls), or the monitor token (watch and listen only)."""
    from engine.supervisor.auth import AuthConfigError, load_tokens

    try:
        tokens = load_tokens(load())
    except AuthConfigError as exc:
        fail(str(exc))
    role: Literal["operator", "monitor"] = "monitor" if monitor else "operator"
    if where:
        source = tokens.source[role]
        typer.echo(
            "settings (XSWARM_SUPERVISOR_%sTOKEN or config.toml)" % ("MONITOR_" if monitor else "")
            if source == "settings"
            else source
        )
        return
    typer.echo(getattr(tokens, role))
