"""`xswarm` (the console with the runtime embedded) and `xswarm attach URL --token T`.

Registered as the root callback: with no sub-command, `xswarm` opens the console. Textual and
the runtime are imported inside the functions, so `xswarm --help` and every other command stay
light, and the console paints before the runtime (and torch) is even imported.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, VERSION_OPTION, fail, load

if TYPE_CHECKING:
    from engine.config import Settings

_STARTED = time.perf_counter()
"""When the CLI imported this module: the origin of the time-to-first-paint figure in the log."""


def _run_console(link: object, *, read_only: bool, theme: str | None, settings: Settings | None = None) -> None:
    """Run the app on ``link``. A ``--theme`` typed on the command line must exist (exit 2 naming
    the available ones); an unknown ``ui.theme`` in the settings only falls back with a notice."""
    if theme is not None:
        from themes import list_themes

        if theme not in list_themes():
            fail(f"unknown theme {theme!r}; available: {', '.join(list_themes())}", EXIT_BAD_INPUT)
    from engine.paths import resolve_paths
    from themes import list_themes
    from xswarm_tui.app import XswarmApp
    from xswarm_tui.preferences import choose_theme, remember_theme

    settings = settings or load()
    state = resolve_paths().state
    app = XswarmApp(
        link,  # type: ignore[arg-type]
        read_only=read_only,
        theme=choose_theme(theme, settings, state, list_themes()),
        poll_interval_s=settings.ui.poll_interval_s,
        reveal_callers=settings.ui.reveal_callers,
        started_at=_STARTED,
        transfer_number=settings.twilio.transfer_number,
        save_theme=lambda name: remember_theme(state, name),
    )
    try:
        app.run()
    finally:
        link.close()  # type: ignore[attr-defined]  # embedded: ends calls, stops servers, flushes the DB


def register(app: typer.Typer) -> None:
    @app.callback(invoke_without_command=True)
    def console(
        ctx: typer.Context,
        model: str | None = typer.Option(None, "--model", help="Voice model: auto, moshi, synthetic:tiny, echo, …"),
        read_only: bool = typer.Option(False, "--read-only", help="Hide every key that acts on a call."),
        theme: str | None = typer.Option(None, "--theme", help="Theme name from themes/ (default: settings ui.theme)."),
        _version: bool = VERSION_OPTION,
    ) -> None:
        """Operator console for a voice AI that answers phone calls (runs the runtime in this process)."""
        from engine.logging_setup import configure

        configure()  # the console owns the terminal: every record goes to the log file
        if ctx.invoked_subcommand is not None:
            return
        from xswarm_tui.link import EmbeddedLink

        settings = load()
        if model is not None and model != "auto":  # as `xswarm serve`: a typo exits 2, not a console with no model
            from engine.models.registry import ModelSpecError, resolve

            try:
                resolve(model, settings)
            except ModelSpecError as exc:
                fail(str(exc), EXIT_BAD_INPUT)

        def build() -> object:
            from engine.runtime import Runtime

            return Runtime(settings, model_spec=model)

        _run_console(EmbeddedLink(build, read_only=read_only), read_only=read_only, theme=theme, settings=settings)

    @app.command("attach")
    def attach(
        url: str = typer.Argument(..., help="Supervisor socket, e.g. ws://127.0.0.1:9999"),
        token: str = typer.Option(
            ...,
            "--token",
            envvar="XSWARM_SUPERVISOR_TOKEN",
            help="Operator token (may act) or monitor token (watch only).",
        ),
        read_only: bool = typer.Option(False, "--read-only", help="Hide every key that acts on a call."),
        theme: str | None = typer.Option(None, "--theme", help="Theme name from themes/."),
    ) -> None:
        """The same console, fed by a runtime elsewhere over the supervisor protocol."""
        if not url.startswith(("ws://", "wss://")):
            raise typer.BadParameter("must start with ws:// or wss://", param_hint="URL")
        from xswarm_tui.link import AttachedLink

        _run_console(AttachedLink(url, token, read_only=read_only), read_only=read_only, theme=theme)
