"""`xswarm` (the console with the runtime embedded) and `xswarm attach URL --token T`.

Registered as the root callback: with no sub-command, `xswarm` opens the console. Textual and
the runtime are imported inside the functions, so `xswarm --help` and every other command stay
light, and the console paints before the runtime (and torch) is even imported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, VERSION_OPTION, fail, load

if TYPE_CHECKING:
    from engine.config import Settings
    from xswarm_tui.link import Link

_STARTED = time.perf_counter()
"""When the CLI imported this module: the origin of the time-to-first-paint figure in the log."""


def _run_console(link: Link, *, read_only: bool, theme: str | None, settings: Settings | None = None) -> None:
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
        link,
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
        link.close()  # embedded: ends calls, stops servers, flushes the DB


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
        urls: list[str] = typer.Argument(
            None, help="Supervisor socket(s), e.g. ws://127.0.0.1:9999; several make a fleet console."
        ),
        token: str = typer.Option(
            ...,
            "--token",
            envvar="XSWARM_SUPERVISOR_TOKEN",
            help="Operator token (may act) or monitor token (watch only); the same on every node.",
        ),
        fleet: bool = typer.Option(
            False, "--fleet", help="Attach to every node in the shared database (TURSO_DATABASE_URL)."
        ),
        read_only: bool = typer.Option(False, "--read-only", help="Hide every key that acts on a call."),
        theme: str | None = typer.Option(None, "--theme", help="Theme name from themes/."),
    ) -> None:
        """The same console, fed by a runtime elsewhere (or a fleet of them) over the supervisor protocol."""
        urls = urls or []
        for url in urls:
            if not url.startswith(("ws://", "wss://")):
                raise typer.BadParameter(f"{url!r} must start with ws:// or wss://", param_hint="URL")
        if not urls and not fleet:
            raise typer.BadParameter("give a supervisor URL, several, or --fleet", param_hint="URL")
        if len(urls) == 1 and not fleet:
            from xswarm_tui.link import AttachedLink

            _run_console(AttachedLink(urls[0], token, read_only=read_only), read_only=read_only, theme=theme)
            return
        from xswarm_tui.fleet import FleetLink

        discover = _fleet_discovery() if fleet else None
        link = FleetLink(urls, token, read_only=read_only, discover=discover)
        _run_console(link, read_only=read_only, theme=theme)


def _fleet_discovery() -> Callable[[], list[dict[str, Any]]]:
    """The nodes table of the shared database, read on the fleet link's thread (exit 1 now
    when the database cannot be opened at all)."""
    from engine.store import nodes
    from engine.store.db import StoreError
    from engine.store.migrations import open_database

    settings = load()
    try:
        db = open_database(settings)
    except StoreError as exc:
        fail(f"--fleet needs the shared database: {exc}")
    import atexit

    atexit.register(db.close)
    return lambda: [n.to_json() for n in nodes.list_nodes(db)]
