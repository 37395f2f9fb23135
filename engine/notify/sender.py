"""``OutboxSender``: delivers outbox rows once each, with retries, across crashes.

One attempt: claim the row (committed, with a lease) → check opt-outs (STOP for the number,
the kind for the user) → if an earlier attempt is in doubt, settle it with the provider →
send → commit ``sent`` with the provider's id. The only window where the outcome is unknown
is between the provider's answer and our commit (or a timeout); a row left there comes
back ``in_doubt`` after its lease, and is settled before anything is sent again:

- SMS (Twilio has no idempotency key): the recent messages from our number to theirs are
  listed; one with our text, created since the first attempt and not already recorded for
  another row, IS our message: it is recorded, not resent.
- Email (SendGrid has neither an idempotency key nor a free lookup): every mail carries its
  outbox id in ``custom_args``; SendGrid's signed ``processed`` event brings it back through
  the Event Webhook and marks the row sent (``webhooks.sendgrid_mail``). A row in doubt waits
  ``notify.email_confirm_wait_s`` for that event and is only then sent again (a duplicate
  is then possible only if the Event Webhook is not set up or lags beyond the wait).

Runs inside the webhooks server (woken after effects enqueue rows, polling otherwise) and
in the CLI (``drain``: the rows it just queued, or all due ones for ``xswarm notify drain``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from engine.config import Settings
from engine.notify import links
from engine.notify.sendgrid_client import Email, SendGridClient, SendGridError, SendGridUnreachable
from engine.store import optouts
from engine.store import outbox as store
from engine.store.db import Database, StoreError
from engine.store.outbox import Draft, OutboxRow, Statement
from engine.telephony.twilio_rest import UNSUBSCRIBED, TwilioClient, TwilioError, TwilioUnreachable

log = logging.getLogger("xswarm.notify")
OUTBOX_ARG = "xswarm_outbox"
"""The ``custom_args`` key that carries a mail's outbox id into SendGrid's events."""
LEASE_SHARE = 0.8
"""Of its lease, the part an attempt may spend talking to the provider (the rest is for the commit)."""
CLOCK_SLACK_MS = 120_000
"""How far Twilio's clock may be behind ours when matching a message to a first attempt."""


class OutboxSender:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        twilio: TwilioClient,
        mail: SendGridClient,
        *,
        batch: int = 32,
        poll_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.db = db
        self.twilio = twilio
        self.mail = mail
        self.batch = batch
        self.poll_s = poll_s
        self.lease_ms = int(settings.notify.lease_s * 1000)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------------- running

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="xswarm-outbox")

    async def stop(self) -> None:
        """Stop sending. A send cut off here comes back in doubt after its lease. The flag,
        not only the cancel: Python 3.11's ``wait_for`` loses a cancel that arrives as the
        wake-up it waits for completes (seen when rows are queued during shutdown)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        pause = 0.0
        while not self._stopping:
            self._wake.clear()  # before the batch: a wake-up during it means more rows, now
            try:
                busy = await self.drain_once()
                pause = 0.0
            except StoreError as exc:
                pause = min(30.0, max(1.0, pause * 2))
                log.warning("outbox: cannot claim rows (retrying in %.0f s): %s", pause, exc)
                busy = False
            if busy:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), pause or self.poll_s)
            except TimeoutError:
                pass

    async def drain_once(self, ids: list[str] | None = None) -> bool:
        """Claim and deliver one batch of due rows; True when the batch was full."""
        rows = await asyncio.wrap_future(store.claim_due(self.db, limit=self.batch, lease_ms=self.lease_ms, ids=ids))
        await asyncio.gather(*(self.deliver(row) for row in rows))
        return len(rows) == self.batch

    async def drain(self, ids: list[str] | None = None) -> None:
        """Deliver every row that is due now (``ids``: only those); rows that fail stay
        queued with their retry time."""
        while await self.drain_once(ids):
            pass

    # ------------------------------------------------------------------------ one row

    async def deliver(self, row: OutboxRow) -> None:
        try:
            status, statements = await self._attempt(row)
        except StoreError as exc:  # the lease runs out and the row comes back
            log.warning("outbox %s: not attempted: %s", row.id, exc)
            return
        except Exception as exc:  # a bug must not stop the sender; where it struck is unknown
            log.exception("outbox %s: attempt %d failed unexpectedly", row.id, row.attempts)
            status, statements = self._failed(row, f"{type(exc).__name__}: {exc}", in_doubt=True)
        try:
            await asyncio.wrap_future(self.db.submit_script(statements))
        except StoreError as exc:
            log.error("outbox %s: %s but not recorded (settled on its next attempt): %s", row.id, status, exc)
            return
        log.info("outbox %s (%s): %s", row.id, row.channel, status)

    async def _attempt(self, row: OutboxRow) -> tuple[str, list[Statement]]:
        """What this attempt did, as (status, statements to commit)."""
        blocked = await self.db.aread(lambda d: _blocked(d, row))
        if blocked:
            return "suppressed", [store.suppressed_statement(row.id, blocked)]
        try:
            # No attempt may outlive its lease: another sender would take the row for one in
            # doubt while this one could still reach the provider.
            async with asyncio.timeout(self.lease_ms / 1000 * LEASE_SHARE):
                if row.in_doubt:
                    settled = await self._settle(row)
                    if settled is not None:
                        return settled
                provider_id = await self._send(row)
        except TimeoutError:
            return self._failed(row, "no answer within the lease", in_doubt=True)
        except (TwilioUnreachable, SendGridUnreachable) as exc:
            return self._failed(row, str(exc), in_doubt=True)
        except TwilioError as exc:
            if exc.code == UNSUBSCRIBED and row.channel == "sms":
                stop = optouts.sms_statement(row.to_addr, "STOP", store.now_ms())
                assert stop is not None
                return "suppressed", [stop, store.suppressed_statement(row.id, "the number texted STOP (Twilio 21610)")]
            return self._failed(row, str(exc), in_doubt=False)
        except SendGridError as exc:
            return self._failed(row, str(exc), in_doubt=False)
        return "sent", store.sent_statements(row.id, provider_id)

    def _failed(self, row: OutboxRow, error: str, *, in_doubt: bool) -> tuple[str, list[Statement]]:
        dead, statement = store.failed_statement(
            row, error, in_doubt=in_doubt, max_attempts=self.settings.notify.max_attempts
        )
        log.warning(
            "outbox %s: attempt %d failed%s: %s", row.id, row.attempts, " (in doubt)" if in_doubt else "", error
        )
        return ("dead" if dead else "failed"), [statement]

    async def _settle(self, row: OutboxRow) -> tuple[str, list[Statement]] | None:
        """Settle an earlier attempt whose outcome is unknown: the statements recording it as
        sent, or a wait; None when it did not reach the provider (send now)."""
        if row.channel == "sms":
            since = (row.first_attempt_at or row.created_at) - CLOCK_SLACK_MS
            for message in await self.twilio.recent_sms(to=row.to_addr, from_=row.from_addr or ""):
                created_ms = message.created.timestamp() * 1000 if message.created else since
                # endswith: a trial account's messages start with Twilio's own prefix.
                if not message.body.strip().endswith(row.body.strip()) or created_ms < since:
                    continue
                if await self.db.aread(functools.partial(store.provider_id_taken, provider_id=message.sid)):
                    continue
                log.info("outbox %s: the earlier attempt reached Twilio (%s); not sending again", row.id, message.sid)
                return "sent", store.sent_statements(row.id, message.sid, note="settled: Twilio had it")
            return None
        wait_ms = int(self.settings.notify.email_confirm_wait_s * 1000)
        until = (row.doubt_at or row.attempt_at or row.created_at) + wait_ms
        if store.now_ms() < until:
            reason = "in doubt: waiting for SendGrid's processed event before sending again"
            return "waiting", [store.wait_statement(row, until, reason)]
        log.warning("outbox %s: no word from SendGrid on the earlier attempt; sending again", row.id)
        return None

    async def _send(self, row: OutboxRow) -> str | None:
        if row.channel == "sms":
            if not row.from_addr:
                raise TwilioError("no twilio.from_number to send from")
            return await self.twilio.send_sms(to=row.to_addr, from_=row.from_addr, body=row.body)
        return await self.mail.send(
            Email(
                to=row.to_addr,
                subject=row.subject or "xswarm",
                text=row.body,
                html=row.html,
                headers=self._unsubscribe_headers(row),
                custom_args={OUTBOX_ARG: row.id},
            )
        )

    def _unsubscribe_headers(self, row: OutboxRow) -> dict[str, str]:
        """``List-Unsubscribe`` on every email: the signed one-click URL (RFC 8058) when there
        is one, else a mailto to the operator."""
        url = links.unsubscribe_url(self.settings, row.user_id, row.kind) if row.user_id else None
        if url is not None:
            return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
        contact = self.settings.notify.operator_email or self.settings.sendgrid.from_email
        return {"List-Unsubscribe": f"<mailto:{contact}?subject=unsubscribe%20{row.kind}>"}


def _blocked(db: Database, row: OutboxRow) -> str | None:
    """Why this row must not go out, or None."""
    if row.channel == "sms" and optouts.sms_opted_out(db, row.to_addr):
        return "the number texted STOP"
    if optouts.kind_off(db, row.user_id, row.kind):
        return f"the user turned off {row.kind} notifications"
    return None


@asynccontextmanager
async def open_sender(settings: Settings, db: Database) -> AsyncIterator[OutboxSender]:
    """A sender on its own HTTP session (the CLI's; servers build theirs on the shared one)."""
    async with aiohttp.ClientSession() as session:
        yield OutboxSender(
            settings, db, TwilioClient(settings.twilio, session), SendGridClient(settings.sendgrid, session)
        )


async def send_now(settings: Settings, db: Database, drafts: list[Draft]) -> list[OutboxRow]:
    """Queue ``drafts`` and try them at once (the CLI's path); returns their rows as they
    stand afterwards. A draft whose id is already queued is not queued twice; whatever did
    not go out stays queued for the webhooks server or ``xswarm notify drain``."""
    if not drafts:
        return []
    await asyncio.wrap_future(db.submit_script([store.enqueue_statement(d) for d in drafts]))
    ids = [d.id for d in drafts]
    async with open_sender(settings, db) as sender:
        await sender.drain(ids)
    found = await db.aread(lambda d: [store.get(d, i) for i in ids])
    return [row for row in found if row is not None]
