"""``xswarm supervisor token [--monitor]``: print a supervisor token, only when asked.

Tokens come from settings (``XSWARM_SUPERVISOR_TOKEN`` / ``XSWARM_SUPERVISOR_MONITOR_TOKEN``)
or, when unset, from ``<config>/supervisor-tokens.json`` (0600), created here or at the first
``xswarm serve``. The token goes to stdout alone so it can be piped:
``xswarm attach ws://host:9999 --token "$(xswarm supervisor token)"``.
"""

from __future__ import annotations

import typer

from xswarm_tui.commands._common import fail, load

app = typer.Typer(
    help="Supervisor socket (:9999) tokens: show, add, retire (rotation without a restart).", no_args_is_help=True
)


@app.command()
def token(
    monitor: bool = typer.Option(False, "--monitor", help="The read-only (monitor) token instead of the operator one."),
    where: bool = typer.Option(False, "--where", help="Print where the token is kept instead of the token."),
) -> None:
    """Print the operator token (may act on calls), or the monitor token (watch and listen only);
    the newest one where several are accepted (`xswarm supervisor tokens`)."""
    from engine.supervisor.auth import AuthConfigError, Role, load_tokens

    try:
        tokens = load_tokens(load())
    except AuthConfigError as exc:
        fail(str(exc))
    role: Role = "monitor" if monitor else "operator"
    if where:
        source = tokens.source[role]
        typer.echo(
            "settings (XSWARM_SUPERVISOR_%sTOKEN or config.toml)" % ("MONITOR_" if monitor else "")
            if source == "settings"
            else source
        )
        return
    typer.echo(getattr(tokens, role))


@app.command("tokens")
def tokens_list(as_json: bool = typer.Option(False, "--json", help="A JSON array instead of a table.")) -> None:
    """List the accepted tokens by fingerprint (never the tokens); the newest per role is marked."""
    import json

    from engine.supervisor.auth import AuthConfigError
    from engine.supervisor.tokens import entries

    try:
        found = entries(load())
    except AuthConfigError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps([e.__dict__ for e in found]))
        return
    for e in found:
        typer.echo(f"{e.role:<9} {e.fingerprint}  {'newest' if e.newest else 'older '}  {e.source}")


@app.command("add-token")
def add_token(
    monitor: bool = typer.Option(False, "--monitor", help="A read-only (monitor) token instead of an operator one."),
) -> None:
    """Create another token (the old ones stay valid) and print it. A running node accepts it
    within a second; move the consoles over, then `xswarm supervisor retire-token`."""
    from engine.supervisor.auth import AuthConfigError
    from engine.supervisor.tokens import add

    try:
        typer.echo(add(load(), "monitor" if monitor else "operator"))
    except AuthConfigError as exc:
        fail(str(exc))


@app.command("retire-token")
def retire_token(
    fingerprint: str = typer.Argument(..., help="The token's fingerprint (or its first 4+ characters)."),
) -> None:
    """Stop accepting a token; consoles still logged in with it are closed within a second."""
    from engine.supervisor.auth import AuthConfigError
    from engine.supervisor.tokens import retire

    try:
        entry = retire(load(), fingerprint)
    except AuthConfigError as exc:
        fail(str(exc))
    typer.echo(f"retired {entry.role} token {entry.fingerprint}")
