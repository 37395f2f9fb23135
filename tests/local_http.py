"""A local HTTP server on 127.0.0.1 for tests that fake a provider's API at the HTTP boundary."""

from __future__ import annotations

from aiohttp import web


async def start_local_app(*routes: web.RouteDef) -> tuple[web.AppRunner, int]:
    """Serve ``routes`` on a free port; returns the runner (``await runner.cleanup()``) and port."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])
