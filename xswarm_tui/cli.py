"""The ``xswarm`` command line (Typer).

Each command group lives in ``xswarm_tui/commands/<group>.py`` and keeps its heavy imports
(textual, torch, aiohttp servers) inside the command functions, so ``xswarm --help`` stays
fast and never imports torch, moshi or textual.

Errors reach the operator as one line on stderr: a broken settings file exits 2 naming the
key and line, never with a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="xswarm",
    help="Operator console for a voice AI that answers phone calls.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: importing Typer's rich formatter alone costs ~70 ms
)

# (module under xswarm_tui.commands, how it attaches). "callback" and "commands" modules get
# `register(app)`: a "callback" module defines the root behaviour (`xswarm` with no
# subcommand, replacing the default below), a "commands" module adds top-level commands;
# every other module exposes `app` as a sub-command group of that name.
_GROUPS: list[tuple[str, str]] = [
    ("config", "config"),
    ("db", "db"),
    ("users", "users"),
    ("doctor", "commands"),
    ("capacity", "commands"),
    ("backup", "backup"),
    ("supervisor", "supervisor"),
    ("models", "models"),
    ("bench", "bench"),
    ("serve", "commands"),
    ("call", "commands"),
    ("records", "commands"),
    ("webhooks", "webhooks"),
    ("billing", "billing"),
    ("notify", "notify"),
    ("nodes", "nodes"),
    ("tui", "callback"),
]


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """Operator console for a voice AI that answers phone calls."""
    from engine.logging_setup import configure

    configure()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _register() -> None:
    for module_name, how in _GROUPS:
        module = importlib.import_module(f"xswarm_tui.commands.{module_name}")
        if how in ("callback", "commands"):
            module.register(app)
        else:
            app.add_typer(module.app, name=how)


_register()


def main() -> None:
    """Console-script entry: settings errors raised anywhere become one line and exit 2."""
    try:
        app()
    except Exception as exc:
        # A ConfigError implies engine.config is loaded; not importing it up front keeps
        # `xswarm --help` from paying for pydantic.
        config = sys.modules.get("engine.config")
        if config is not None and isinstance(exc, config.ConfigError):
            print(f"xswarm: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
