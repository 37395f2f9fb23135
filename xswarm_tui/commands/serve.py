"""``xswarm serve``: the runtime without a terminal UI (bridge, supervisor, webhooks, model)."""

from __future__ import annotations

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, fail, load


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    model: str = typer.Option(
        None, "--model", help="Model to serve: auto, echo, synthetic:tiny, moshi, ... (default: model.name)."
    ),
    bridge_port: int = typer.Option(None, "--bridge-port", help="Twilio Media Streams port (default 9998; 0: off)."),
    supervisor_port: int = typer.Option(None, "--supervisor-port", help="Supervisor port (default 9999; 0: off)."),
    webhooks_port: int = typer.Option(
        None, "--webhooks-port", help="Webhooks port (default: on at 8787 when server.webhooks_enabled; 0: off)."
    ),
    slots: int = typer.Option(
        None, "--slots", help="Concurrent calls (model batch size; default: model.slots or the model's own)."
    ),
) -> None:
    """Run the voice runtime headless until Ctrl-C or SIGTERM."""
    import queue
    import signal
    import threading

    from engine import events
    from engine.logging_setup import configure
    from engine.models.registry import ModelSpecError, resolve
    from engine.runtime import Runtime
    from engine.store.db import StoreError

    for name, port in (
        ("--bridge-port", bridge_port),
        ("--supervisor-port", supervisor_port),
        ("--webhooks-port", webhooks_port),
    ):
        if port is not None and not 0 <= port <= 65535:
            fail(f"{name} must be between 0 and 65535", EXIT_BAD_INPUT)
    if slots is not None and not 1 <= slots <= 256:
        fail("--slots must be between 1 and 256", EXIT_BAD_INPUT)
    settings = load()
    if slots is not None:
        settings.model.slots = slots
    spec = model or settings.model.name
    try:
        resolve(spec, settings) if spec != "auto" else None
    except ModelSpecError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    log_file = configure()
    notes: queue.SimpleQueue[str] = queue.SimpleQueue()

    def on_event(event: events.Event) -> None:  # bus thread: hand lines to the main thread
        if isinstance(event, events.ModelStatusChanged) and event.state in ("ready", "failed", "fallback"):
            notes.put(f"model {event.model}: {event.state} - {event.detail}")

    runtime = Runtime(
        settings, model_spec=spec, bridge_port=bridge_port, supervisor_port=supervisor_port, webhooks_port=webhooks_port
    )
    runtime.bus.subscribe(on_event)
    try:
        runtime.start()
    except (OSError, StoreError) as exc:
        fail(f"cannot start: {exc}")
    host = settings.server.host
    typer.echo(f"xswarm node {runtime.node_id} (logs: {log_file})")
    for what, listening, scheme in (
        ("bridge", runtime.bridge_port, "ws"),
        ("supervisor", runtime.supervisor_port, "ws"),
        ("webhooks", runtime.webhooks_port, "http"),
    ):
        typer.echo(f"  {what:<10} " + (f"{scheme}://{host}:{listening}" if listening else "off"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.2):
        while not notes.empty():
            typer.echo(notes.get())
    typer.echo("stopping: ending calls, closing servers")
    runtime.stop()
