"""The ``xswarm`` command line (Typer).

Each command group lives in ``xswarm_tui/commands/<group>.py`` and keeps its heavy imports
(textual, torch, aiohttp servers) inside the command functions, so ``xswarm --help`` stays
fast and never imports torch, moshi or textual.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="xswarm",
    help="Operator console for a voice AI that answers phone calls.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module under xswarm_tui.commands, how it attaches). "callback" modules define the root
# behaviour (`xswarm` with no subcommand); "commands" modules add top-level commands to `app`;
# every other module exposes `app` as a sub-command group of that name.
_GROUPS: list[tuple[str, str]] = [("supervisor", "supervisor")]


def _register() -> None:
    for module_name, how in _GROUPS:
        module = importlib.import_module(f"xswarm_tui.commands.{module_name}")
        if how == "commands":
            module.register(app)
        else:
            app.add_typer(module.app, name=how)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
