"""``WebhooksServer``: the app plus its inbox processor, started on a loop and stopped cleanly.

Used by ``xswarm webhooks serve`` (``inline_reads=True``: the loop is its own) and by the
runtime (``WebhooksServer(settings, db, bus)``: reads go through the reader pool, off the loop
that carries the voice tick).
The processor and the outbox sender start with the server, so events left pending and
messages left unsent by a previous run (or another node) are picked up at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar, Unpack

from aiohttp import web

from engine.config import Settings
from engine.events import EventBus
from engine.store import inbox
from engine.store.db import Database, StoreError
from engine.tasks import cancel_and_wait
from webhooks import twilio_sms
from webhooks.app import EFFECTS, create_app
from webhooks.hub import Hub, HubOptions
from webhooks.processor import InboxProcessor

log = logging.getLogger("xswarm.webhooks")
HOUSEKEEPING_S = 60.0
PRUNE_INBOX_S = 3600.0
DAY_MS = 86_400_000
GC_GEN0_THRESHOLD = 20_000
SWITCH_INTERVAL_S = 0.0005
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, fast_loop: bool = True) -> T:
    """Run ``main`` on uvloop where it is installed (not on Windows), else on asyncio's loop.

    Why: a standalone webhook server spends most of its CPU in the event loop's socket and
    callback machinery, which uvloop's C loop cuts (docs/performance.md, "Webhooks"). Only
    for a process whose loop is the server's own; the runtime creates its loop itself."""
    if fast_loop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def tune_server_process() -> None:
    """Call once the server has started, in a process that is the server alone (it is
    process-wide, so never in the runtime).

    The collector: everything alive now (modules, the app, settings) moves out of its sight,
    and the young generation is collected less often. Each request allocates thousands of
    short-lived objects, every full pass re-walked the long-lived heap for nothing, and
    reference counting frees nearly all request garbage anyway.

    The GIL switch interval: 0.5 ms instead of 5 ms. Every stored delivery waits on the
    database writer thread, which needs the GIL back after each SQLite call; with the event
    loop busy (a flood of refusals), each of those waits lasted a whole interval and signed
    SMS queued behind the attack (docs/performance.md, "Webhooks")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


class WebhooksServer:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        bus: EventBus,
        *,
        process: bool = True,
        max_attempts: int = 8,
        **hub_options: Unpack[HubOptions],
    ) -> None:
        """``process``: run the inbox processor here. ``hub_options`` go to the one ``Hub``
        (e.g. ``record_feed=False`` when the host already records the bus; ``inline_reads=True``
        only when this server has the loop to itself)."""
        self.hub = Hub(settings, db, bus, **hub_options)
        self.app = create_app(self.hub)
        self.processor = InboxProcessor(self.hub, EFFECTS, max_attempts=max_attempts) if process else None
        self._runner: web.AppRunner | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 8787, *, reuse_port: bool = False) -> None:
        """``reuse_port``: share the port with sibling worker processes (``webhooks.workers``)."""
        await self.hub.open()
        # A request still in flight at stop gets Twilio's own webhook timeout (15 s) to finish,
        # not aiohttp's default 60 s wait plus 60 s after cancelling it.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=15.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()  # nothing listens: give back the session and files too
            self._runner = None
            await self.hub.close()
            raise
        self.port = int(self._runner.addresses[0][1])
        if self.processor is not None:
            self.processor.start()
            assert self.hub.outbox is not None
            self.hub.outbox.start()
        self._housekeeping = asyncio.create_task(self._housekeep())
        who = f"webhooks worker {self.hub.worker}" if self.hub.worker else "webhooks"
        log.info("%s listening on http://%s:%s", who, host, self.port)

    async def stop(self) -> None:
        await cancel_and_wait(self._housekeeping)
        if self._runner is not None:
            await self._runner.cleanup()  # stop taking requests first
            self._runner = None
        if self.processor is not None:
            await self.processor.stop()
        if self.hub.outbox is not None:
            await self.hub.outbox.stop()
        await self.hub.close()
        log.info("webhooks stopped")

    async def _housekeep(self) -> None:
        pruned_at = 0.0
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            twilio_sms.prune(self.hub, self.hub.settings.llm.timeout_s + 120)
            if time.monotonic() - pruned_at >= PRUNE_INBOX_S:
                pruned_at = time.monotonic()
                await self.prune_inbox()

    async def prune_inbox(self, now_ms: int | None = None) -> int:
        """Delete processed inbox rows older than ``server.inbox_retention_days`` (in batches,
        so no transaction holds the writer long); returns how many went."""
        cutoff = (
            now_ms if now_ms is not None else inbox.now_ms()
        ) - self.hub.settings.server.inbox_retention_days * DAY_MS
        removed = 0
        while True:
            try:
                count = await asyncio.wrap_future(self.hub.db.submit(*inbox.prune_statement(cutoff)))
            except StoreError as exc:
                log.warning("inbox pruning failed (retried in an hour): %s", exc)
                return removed
            removed += int(count or 0)
            if not count or count < inbox.PRUNE_BATCH:
                if removed:
                    log.info(
                        "inbox: pruned %d processed events older than %d days",
                        removed,
                        self.hub.settings.server.inbox_retention_days,
                    )
                return removed
