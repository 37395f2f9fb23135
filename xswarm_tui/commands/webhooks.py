"""``xswarm webhooks serve|inbox|replay``: the webhook server alone, and its durable inbox."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, EXIT_FAILED, database, fail, load

if TYPE_CHECKING:
    from webhooks.limits import RateLimit

app = typer.Typer(help="Twilio, SendGrid and Stripe webhooks and the identity API.", no_args_is_help=True)


@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="Address to bind (default: server.host, 127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="Port (default: server.webhooks_port, 8787; 0 picks a free one)."),
    rate_limit: float = typer.Option(
        20.0,
        "--rate-limit",
        help="Refused requests (bad signature, malformed body) per second per source and route group before "
        "a source is answered 429; signed deliveries are never limited (0: off). The source is the client "
        "address, or X-Forwarded-For from a server.trusted_proxies address.",
    ),
    workers: int = typer.Option(
        1, "--workers", min=1, max=64, help="Server processes sharing the port (Linux; one core each at full load)."
    ),
) -> None:
    """Run the webhook server (and its inbox processor) until Ctrl-C or SIGTERM."""
    import asyncio
    import signal

    from engine.events import EventBus
    from engine.logging_setup import configure
    from webhooks.limits import RateLimit
    from webhooks.server import WebhooksServer, tune_server_process
    from webhooks.server import run as run_server

    if rate_limit < 0:
        fail("--rate-limit must be 0 or more", EXIT_BAD_INPUT)
    settings = load()
    log_file = configure()
    bind_host = host or settings.server.host
    bind_port = settings.server.webhooks_port if port is None else port
    limit = RateLimit(rate_limit, rate_limit * 5) if rate_limit else None
    if not settings.server.public_url:
        typer.echo(
            "warning: XSWARM_PUBLIC_URL is not set; Twilio signatures are checked against the Host header", err=True
        )
    if workers > 1:
        _serve_workers(bind_host, bind_port, workers, limit, log_file)
        return

    async def run() -> None:
        with database(settings) as db:
            server = WebhooksServer(
                settings, db, EventBus(), rate_limit=limit, inline_reads=True
            )  # the loop is ours alone
            try:
                await server.start(bind_host, bind_port)
            except OSError as exc:
                fail(f"cannot listen on {bind_host}:{bind_port}: {exc}")
            tune_server_process()  # this process is the server alone
            typer.echo(f"webhooks listening on http://{bind_host}:{server.port} (logs: {log_file})")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            await server.stop()

    run_server(run())  # uvloop where installed


def _serve_workers(host: str, port: int, count: int, limit: RateLimit | None, log_file: Path) -> None:
    """``--workers N``: migrate once here, then N worker processes on one port."""
    import signal
    import threading

    from webhooks.workers import WorkerPlan, WorkersError, serve_workers

    with database():
        pass  # migrations run once, in the parent, before any worker opens the file
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def ready(bound: int) -> None:
        typer.echo(f"webhooks listening on http://{host}:{bound} ({count} workers; logs: {log_file})")

    try:
        serve_workers(WorkerPlan(host, port, count, limit), ready, stop)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}")
    except WorkersError as exc:
        fail(str(exc))


def _when(ms: int | None) -> str:
    if ms is None:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command()
def inbox(
    dead: bool = typer.Option(False, "--dead", help="Only dead letters (gave up after all retries)."),
    status: str = typer.Option(None, "--status", help="pending, done, failed or dead."),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List webhook events, newest first (payloads are not shown: they hold personal data)."""
    from engine.store import inbox as store

    wanted = "dead" if dead else status
    if wanted not in (None, "pending", "done", "failed", "dead"):
        fail(f"unknown status {wanted!r}; use pending, done, failed or dead", EXIT_BAD_INPUT)
    with database() as db:
        rows = store.list_rows(db, status=wanted, limit=limit)  # type: ignore[arg-type]
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "id": r.key,
                        "provider": r.provider,
                        "event_id": r.event_id,
                        "type": r.event_type,
                        "status": r.status,
                        "attempts": r.attempts,
                        "received_at": r.received_at,
                        "next_attempt_at": r.next_attempt_at,
                        "last_error": r.last_error,
                    }
                    for r in rows
                ]
            )
        )
        return
    if not rows:
        typer.echo("no events" + (f" with status {wanted}" if wanted else ""))
        return
    typer.echo(f"{'ID':<52} {'TYPE':<32} {'STATUS':<8} {'TRIES':>5}  {'RECEIVED (UTC)':<19}  LAST ERROR")
    for r in rows:
        typer.echo(
            f"{r.key[:52]:<52} {(r.event_type or '')[:32]:<32} {r.status:<8} {r.attempts:>5}"
            f"  {_when(r.received_at):<19}  {(r.last_error or '')[:60]}"
        )


@app.command()
def replay(
    event: str = typer.Argument(..., metavar="ID", help="provider:event_id, as `xswarm webhooks inbox` shows it."),
    queue_only: bool = typer.Option(False, "--queue", help="Only queue it again for the running server."),
) -> None:
    """Run one stored event again now (dead letters included), or queue it with --queue."""
    import asyncio

    from engine.events import EventBus
    from engine.logging_setup import configure
    from engine.store import inbox as store
    from webhooks.app import EFFECTS
    from webhooks.hub import Hub
    from webhooks.processor import InboxProcessor

    settings = load()
    configure()  # the processor logs to the log files, not over the command's own output
    with database(settings) as db:
        if queue_only:
            if not store.replay(db, event):
                fail(f"no event {event!r} in the inbox", EXIT_FAILED)
            typer.echo(f"{event} queued again")
            return
        row = store.claim_one(db, event, lease_ms=120_000)
        if row is None:
            fail(f"no event {event!r} in the inbox", EXIT_FAILED)

        async def run() -> None:
            hub = Hub(settings, db, EventBus())
            await hub.open()
            try:
                await InboxProcessor(hub, EFFECTS, max_attempts=1).process_one(row)
            finally:
                await hub.close()

        asyncio.run(run())
        after = store.get(db, event)
    if after is None or after.status != "done":
        fail(f"{event} failed again: {after.last_error if after else 'row vanished'}", EXIT_FAILED)
    typer.echo(f"{event} processed")
