"""``xswarm config show|path|init``: see and start the settings file (secrets masked)."""

from __future__ import annotations

import json

import typer

from xswarm_tui.commands._common import EXIT_FAILED, fail, load

app = typer.Typer(help="Show, locate or create the settings file.", no_args_is_help=True)


@app.command()
def show(as_json: bool = typer.Option(False, "--json", help="One JSON object instead of TOML.")) -> None:
    """Print the effective settings (file + environment); secrets show as ********."""
    from engine.config import public_view, toml_value

    view = public_view(load())
    if as_json:
        typer.echo(json.dumps(view, indent=2))
        return
    for section, values in view.items():
        typer.echo(f"[{section}]")
        for key, value in values.items():
            typer.echo(f"{key} = {toml_value(value)}" if value is not None else f"# {key} = (unset)")
        typer.echo("")


@app.command()
def path() -> None:
    """Print the settings file's path (XSWARM_CONFIG_FILE or XSWARM_HOME move it)."""
    from engine.paths import resolve_paths

    typer.echo(str(resolve_paths().config_file))


@app.command()
def init(force: bool = typer.Option(False, "--force", help="Overwrite an existing file.")) -> None:
    """Write a commented default settings file (every key at its default, commented out)."""
    from engine.config import default_toml
    from engine.paths import resolve_paths

    target = resolve_paths().config_file
    if target.exists() and not force:
        fail(f"{target} already exists (use --force to overwrite it)", EXIT_FAILED)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(default_toml(), encoding="utf-8")
    target.chmod(0o600)  # it may come to hold secrets
    typer.echo(f"wrote {target}")
