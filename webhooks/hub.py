"""Everything the routes and the processor share, built once per server.

Also the one ingest step every route uses after verification: store the raw event in the
inbox (deduplicated) and turn a database failure into 503, so a provider is never told
"received" for something that was not stored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

import aiohttp
from aiohttp import web

from engine.checkout import StripeCheckout
from engine.config import Settings, secret
from engine.events import Event, EventBus
from engine.notify.sender import OutboxSender
from engine.notify.sendgrid_client import SendGridClient
from engine.storage.base import ObjectStore, StorageError, off_loop
from engine.store import feed, inbox
from engine.store.db import Database, StoreError, log_if_failed
from engine.telephony.twilio_rest import TwilioClient
from webhooks.limits import DEFAULT_RATE_LIMIT, RateLimit, RateLimiter, networks
from webhooks.llm import provider_from_settings
from webhooks.metrics import WebhookMetrics
from webhooks.replies import Replier
from webhooks.verify import SendGridVerifier, StripeVerifier, TwilioVerifier

log = logging.getLogger("xswarm.webhooks")
STORAGE_WAIT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """What processing one inbox row produced: statements committed together with the row's
    ``done`` mark, and events published once that commit succeeded.

    ``inserts`` are single-row INSERTs that depend on nothing else in the script: rows
    committed together have theirs merged into multi-row statements (fewer statements is
    what makes the writer cheap). ``statements`` run in order, one by one."""

    statements: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    inserts: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    notify: bool = False
    """The statements may queue outbox rows: wake the sender once they are committed."""


Effect = Callable[["Hub", inbox.InboxRow], Awaitable[Outcome]]
T = TypeVar("T")


class HubOptions(TypedDict, total=False):
    """``Hub``'s keyword options, for constructors that build a ``Hub`` and pass them on."""

    rate_limit: RateLimit | None
    record_feed: bool
    inline_reads: bool
    worker: str | None


class Hub:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        bus: EventBus,
        *,
        rate_limit: RateLimit | None = DEFAULT_RATE_LIMIT,
        record_feed: bool = True,
        inline_reads: bool = False,
        worker: str | None = None,
    ) -> None:
        """``inline_reads``: run reads of the embedded file on the loop (see ``read``); only
        for a loop the webhooks have to themselves (``xswarm webhooks serve``, the benchmark).
        Inside the runtime the loop also carries the bridge and the 80 ms voice tick, so the
        default is the reader pool."""
        self.settings = settings
        self.db = db
        self.bus = bus
        self.record_feed = record_feed
        self.worker = worker
        """``"2/4"`` in the second of four worker processes (``webhooks.workers``), for ``/health``."""
        self.twilio = TwilioVerifier(secret(settings.twilio.auth_token), settings.server.public_url)
        self.stripe = StripeVerifier(secret(settings.stripe.webhook_secret))
        self.sendgrid = SendGridVerifier(settings.sendgrid.webhook_public_key)
        self.limiter = RateLimiter(rate_limit) if rate_limit else None
        self.trusted_proxies = networks(settings.server.trusted_proxies)
        self.session: aiohttp.ClientSession | None = None
        self._inline_reads = inline_reads and not db.target.remote
        self.replier = Replier(settings, self.read, None)
        """Its LLM provider is set by ``open`` (the provider needs the HTTP session)."""
        self.twilio_rest: TwilioClient | None = None
        self.mail: SendGridClient | None = None
        self.outbox: OutboxSender | None = None
        """Sends the outbox; built by ``open``, run by ``WebhooksServer`` when it processes."""
        self.wake: Callable[[], None] = lambda: None
        """Set by the processor: called after a new row is stored."""
        self.state: dict[str, Any] = {}
        """Per-module runtime state (e.g. SMS replies still being composed)."""
        self._object_store: ObjectStore | None = None
        self._object_store_lock = threading.Lock()
        self.metrics = WebhookMetrics()

    async def open(self) -> None:
        """Create the outbound HTTP session (needs the running loop)."""
        self.session = aiohttp.ClientSession()
        self.replier.llm = provider_from_settings(self.settings, self.session)
        self.twilio_rest = TwilioClient(self.settings.twilio, self.session)
        self.mail = SendGridClient(self.settings.sendgrid, self.session)
        self.replier.checkout = StripeCheckout(self.settings, self.session)
        self.replier.write = self.db.aread
        self.outbox = OutboxSender(self.settings, self.db, self.twilio_rest, self.mail)

    def wake_outbox(self) -> None:
        """Outbox rows were just committed: send them now rather than at the next poll."""
        if self.outbox is not None:
            self.outbox.wake()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ----------------------------------------------------------------------------- storage

    async def in_storage(self, fn: Callable[[ObjectStore], T]) -> T:
        """Run blocking object-store work on storage's own bounded pool (``off_loop``: never
        the pool that parses mail); ``StorageError`` when it has not finished within
        ``STORAGE_WAIT_S``, queueing included, so the provider is told 503 and retries."""
        work = off_loop(lambda: fn(self._store()))
        try:
            return await asyncio.wait_for(work, STORAGE_WAIT_S)
        except TimeoutError:
            raise StorageError(f"object storage did not answer within {STORAGE_WAIT_S:.0f} s") from None

    def _store(self) -> ObjectStore:
        with self._object_store_lock:  # one client for the hub (building one costs ~50 ms)
            if self._object_store is None:
                from engine.storage import open_store

                self._object_store = open_store(self.settings)
            return self._object_store

    # ------------------------------------------------------------------------------- reads

    async def read(self, fn: Callable[[Database], T]) -> T:
        """Run a read-only repository function (never one that waits on a write).

        Reader pool by default. Embedded file with ``inline_reads``: right here on the loop,
        because an indexed read of the local file costs less than the hop to a pool thread and
        back (figures: docs/performance.md, "Webhooks"). That is only for a loop that serves
        nothing else: never inline inside the runtime, where a slow read would delay every
        call's audio. A remote database always uses the pool, since the wait is a network
        round trip the loop must not sit through."""
        if self._inline_reads:
            return fn(self.db)
        return await self.db.aread(fn)

    # ------------------------------------------------------------------------------ ingest

    async def ingest(
        self,
        provider: str,
        event_id: str,
        event_type: str | None,
        payload: str,
        *,
        with_statements: list[tuple[str, tuple[Any, ...]]] | None = None,
        not_before_ms: int | None = None,
    ) -> bool:
        """Store a verified event; True when new, False for a duplicate; 503 when the
        database cannot take it. ``with_statements`` commit in the same transaction (they
        must be idempotent: they run for duplicates too). ``not_before_ms`` keeps every
        node's processor off the row until then."""
        put = inbox.put_statement(provider, event_id, event_type, payload, not_before_ms=not_before_ms)
        try:
            if with_statements:
                counts = await asyncio.wrap_future(self.db.submit_script([put, *with_statements]))
                added = counts[0]
            else:
                added = await asyncio.wrap_future(self.db.submit(*put))
        except StoreError as exc:
            log.error("%s: could not store event (answering 503 so it is retried): %s", provider, exc)
            raise web.HTTPServiceUnavailable(
                text="storage unavailable, retry later", headers={"Retry-After": "5"}
            ) from None
        if added:
            self.wake()
        return bool(added)

    async def ingest_many(self, provider: str, rows: list[tuple[str, str | None, str]]) -> int:
        """Store several events from one request (all or 503); returns how many were new."""
        futures = [
            inbox.put(self.db, provider, event_id, event_type, payload) for event_id, event_type, payload in rows
        ]
        try:
            added = sum([int(await asyncio.wrap_future(f)) for f in futures])
        except StoreError as exc:
            log.error("%s: could not store events (answering 503 so they are retried): %s", provider, exc)
            raise web.HTTPServiceUnavailable(
                text="storage unavailable, retry later", headers={"Retry-After": "5"}
            ) from None
        if added:
            self.wake()
        return added

    def release(self, provider: str, event_id: str) -> None:
        """A row stored with ``not_before_ms`` may be processed now (wakes the processor
        once the change is committed)."""
        loop = asyncio.get_running_loop()
        future = self.db.submit(*inbox.release_statement(provider, event_id))
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.wake))

    # ------------------------------------------------------------------------------ events

    def publish(self, event: Event, *, to_feed: bool) -> None:
        """On the bus always; in the ``events`` table when asked (and ``record_feed``)."""
        self.bus.publish(event)
        if to_feed and self.record_feed:
            try:
                feed.append_event(self.db, event).add_done_callback(log_if_failed("feed row", log))
            except StoreError as exc:
                log.warning("feed row not written: %s", exc)


HUB = web.AppKey("hub", Hub)
"""Where the app keeps its ``Hub``."""
