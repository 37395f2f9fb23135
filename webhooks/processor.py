"""The inbox processor: applies stored webhook events, retries failures, dead-letters.

Why separate from the routes: a provider must get its 2xx within its timeout, and effects
(LLM replies, outbound SMS/email, Stripe state) can be slow or fail. Rows are claimed with a
lease (see ``engine.store.inbox``), so work in flight when the process dies comes due again;
each row's effects commit in one transaction together with its ``done`` mark.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from engine.events import WebhookFailed, WebhookReceived
from engine.store import feed, inbox
from engine.store.db import Statement, StoreError, merge_inserts
from webhooks.hub import Effect, Hub, Outcome

log = logging.getLogger("xswarm.webhooks.processor")


class PermanentError(Exception):
    """The event can never be applied (malformed payload): dead-letter it at once."""


LEASE_LOST = "inbox lease lost"


def lease_statement(rows: list[inbox.InboxRow]) -> Statement:
    """Fails the whole transaction (``inbox lease lost``) unless this processor still holds
    every row's lease: same attempt, not done (the ``inbox_lease`` trigger, migration 0012).
    Why: a processor slower than its lease may find the row claimed again by another box;
    only the current holder may apply it, so an event is applied once."""
    marks = ",".join(["(?, ?)"] * len(rows))
    return (
        f"INSERT INTO inbox_lease (inbox_rowid, attempts) VALUES {marks}",
        tuple(value for row in rows for value in (row.rowid, row.attempts)),
    )


def done_statement(rows: list[inbox.InboxRow]) -> Statement:
    marks = ",".join("?" * len(rows))
    return (
        f"UPDATE webhook_inbox SET status = 'done', next_attempt_at = NULL, last_error = NULL WHERE rowid IN ({marks})",
        tuple(row.rowid for row in rows),
    )


class InboxProcessor:
    def __init__(
        self,
        hub: Hub,
        effects: Mapping[str, Effect],
        *,
        concurrency: int = 256,
        batch: int = 256,
        max_attempts: int = 8,
        lease_ms: int = 120_000,
        poll_s: float = 1.0,
    ) -> None:
        """``concurrency``: rows in flight at once. Too few and the processor falls behind a
        full ingest, SMS replies outgrow ``twilio_sms.MAX_PENDING`` and every dropped entry
        costs a form parse and two reads again (docs/performance.md, "Webhooks")."""
        self.hub = hub
        self.effects = dict(effects)
        self.concurrency = concurrency
        self.batch = batch
        self.max_attempts = max_attempts
        self.lease_ms = lease_ms
        self.poll_s = poll_s
        self.failed = 0
        self._wake = asyncio.Event()
        self._active: set[asyncio.Task[None]] = set()
        self._group: list[tuple[inbox.InboxRow, Outcome, asyncio.Future[None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="xswarm-webhooks-processor")
        self.hub.wake = self._wake.set

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop claiming; give rows in flight ``grace_s`` to finish (the rest come due again
        after their lease)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._active:
            _, pending = await asyncio.wait(self._active, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self) -> None:
        pause = 0.0
        while not self._stopping:
            # Cleared before the claim, not after it: a wake-up (new rows, or ``stop``) that
            # arrives while the claim is in flight must not be lost, or the loop sleeps a
            # whole ``poll_s`` (or back-off ``pause``) before it sees the rows or the stop.
            self._wake.clear()
            free = self.concurrency - len(self._active)
            rows: list[inbox.InboxRow] = []
            if free > 0:
                try:
                    rows = await asyncio.wrap_future(
                        inbox.claim_due(self.hub.db, limit=min(self.batch, free), lease_ms=self.lease_ms)
                    )
                    pause = 0.0
                except StoreError as exc:
                    pause = min(10.0, max(0.5, pause * 2))
                    log.warning("cannot claim inbox rows (retrying in %.1f s): %s", pause, exc)
            for row in rows:
                task = asyncio.create_task(self._process(row))
                self._active.add(task)
                task.add_done_callback(self._done)
            if rows and len(rows) == min(self.batch, free):
                continue  # more may be waiting
            try:
                await asyncio.wait_for(self._wake.wait(), pause or self.poll_s)
            except TimeoutError:
                pass

    def _done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        if not self._stopping and len(self._active) == self.concurrency - 1:
            self._wake.set()  # a slot opened while we were saturated

    async def process_one(self, row: inbox.InboxRow) -> None:
        """Apply one already-claimed row (an operator's replay); failures are recorded."""
        await self._process(row)

    async def _process(self, row: inbox.InboxRow) -> None:
        effect = self.effects.get(row.provider)
        try:
            if effect is None:
                raise PermanentError(f"no handler for provider {row.provider!r}")
            outcome = await effect(self.hub, row)
            await self._commit(row, outcome)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail(row, exc)
            return
        self.hub.metrics.processed.labels(row.provider, "done").inc()
        if outcome.notify:
            self.hub.wake_outbox()
        for event in outcome.events:
            self.hub.publish(event, to_feed=False)  # its feed row was committed with the effects

    async def _commit(self, row: inbox.InboxRow, outcome: Outcome) -> None:
        """Effects, the feed row (of the first event) and the ``done`` mark in one
        transaction, shared with every row that finished in the same loop iteration."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._group:
            asyncio.get_running_loop().call_soon(self._start_flush)
        self._group.append((row, outcome, future))
        await future

    def _start_flush(self) -> None:
        task = asyncio.ensure_future(self._flush())
        self._flushes.add(task)  # a strong reference until it is done
        task.add_done_callback(self._flushes.discard)

    def _script(self, items: list[tuple[inbox.InboxRow, Outcome]]) -> list[Statement]:
        statements: list[Statement] = []
        inserts: list[Statement] = []
        for _, outcome in items:
            statements.extend(outcome.statements)
            inserts.extend(outcome.inserts)
            if outcome.events and self.hub.record_feed:
                inserts.append(feed.event_statement(outcome.events[0]))
        rows = [row for row, _ in items]
        return [lease_statement(rows), *statements, *merge_inserts(inserts), done_statement(rows)]

    async def _flush(self) -> None:
        group, self._group = self._group, []
        try:
            await asyncio.wrap_future(self.hub.db.submit_script(self._script([(r, o) for r, o, _ in group])))
        except StoreError as exc:
            if len(group) == 1:
                _settle(group[0][2], exc)
                return
            # One row's statements may be at fault: commit each alone so only it fails.
            singles = [self.hub.db.submit_script(self._script([(row, outcome)])) for row, outcome, _ in group]
            for (_, _, future), single in zip(group, singles, strict=True):
                try:
                    await asyncio.wrap_future(single)
                except StoreError as single_exc:
                    _settle(future, single_exc)
                else:
                    _settle(future, None)
            return
        for _, _, future in group:
            _settle(future, None)

    async def _fail(self, row: inbox.InboxRow, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if LEASE_LOST in error:
            log.warning("%s: lease expired before its effects were committed; another processor has it", row.key)
            return
        self.failed += 1
        permanent = isinstance(exc, PermanentError)
        if not isinstance(exc, (StoreError, PermanentError)) and not getattr(exc, "expected", False):
            log.exception("%s %s failed (attempt %d)", row.provider, row.event_id, row.attempts)
        else:
            log.warning("%s %s failed (attempt %d): %s", row.provider, row.event_id, row.attempts, error)
        attempts_cap = row.attempts if permanent else self.max_attempts
        dead, future = inbox.mark_failed(self.hub.db, row, error, max_attempts=attempts_cap)
        try:
            await asyncio.wrap_future(future)
        except StoreError as store_exc:
            log.warning("could not record the failure of %s (its lease will expire): %s", row.key, store_exc)
        self.hub.metrics.processed.labels(row.provider, "dead" if dead else "retry").inc()
        self.hub.publish(WebhookFailed(row.provider, row.event_id, error[:300], dead=dead), to_feed=dead)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve a row's commit future unless its task was cancelled meanwhile."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def received(row: inbox.InboxRow, summary: str, user_id: str | None = None) -> WebhookReceived:
    """The generic 'this event was applied' event for the bus and the feed."""
    return WebhookReceived(row.provider, row.event_type or "", summary, user_id)
