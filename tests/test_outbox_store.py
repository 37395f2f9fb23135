"""The outbox's SQL against the embedded file and a real sqld: conditional enqueue, claiming
with a lease, a row that outlived its lease coming back in doubt, and the ``sent`` commit."""

from __future__ import annotations

from engine.store import outbox
from engine.store.db import Database, Target
from engine.store.migrations import migrate
from engine.store.outbox import Draft


def _draft(n: int) -> Draft:
    return Draft(f"welcome:u{n}:sms", "welcome", "sms", f"u{n}", f"+1415555010{n}", "hi", from_addr="+14155550199")


def test_outbox_lifecycle(store_target: Target) -> None:
    db = Database(store_target).start()
    try:
        migrate(db)
        db.write(*outbox.enqueue_statement(_draft(1)))
        db.write(*outbox.enqueue_statement(_draft(1)))  # same id: still one row
        db.write(*outbox.enqueue_statement(_draft(2), when=("0 = ?", (1,))))  # condition false: nothing
        assert [r.id for r in outbox.list_rows(db)] == ["welcome:u1:sms"]

        (row,) = outbox.claim_due(db, limit=10, lease_ms=0, now=1_000).result()
        assert row.status == "sending" and row.attempts == 1 and not row.in_doubt and row.attempt_at == 1_000
        # The lease ran out while it was being sent: it comes back in doubt, naming that attempt.
        (again,) = outbox.claim_due(db, limit=10, lease_ms=60_000, now=2_000).result()
        assert again.in_doubt and again.doubt_at == 1_000 and again.attempt_at == 2_000 and again.attempts == 2
        assert again.first_attempt_at == 1_000
        assert outbox.claim_due(db, limit=10, lease_ms=60_000, now=3_000).result() == []  # leased

        db.submit_script(outbox.sent_statements(row.id, "SM1", note="settled")).result()
        db.submit_script(outbox.sent_statements(row.id, "SM2")).result()  # already sent: no change
        done = outbox.get(db, row.id)
        assert done is not None and done.status == "sent" and done.provider_id == "SM1" and not done.in_doubt
        assert done.last_error == "settled" and outbox.provider_id_taken(db, "SM1")
        assert db.query("SELECT provider_id, direction, to_addr, json_extract(meta, '$.kind') FROM messages") == [
            ("SM1", "out", "+14155550101", "welcome")
        ]

        db.write(*outbox.enqueue_statement(_draft(3)))
        (third,) = outbox.claim_due(db, limit=10, lease_ms=1_000).result()
        dead, failed = outbox.failed_statement(third, "Twilio unreachable", in_doubt=True, max_attempts=5)
        db.write(*failed)
        stored = outbox.get(db, third.id)
        assert not dead and stored is not None and stored.status == "failed" and stored.in_doubt
        assert stored.doubt_at == third.attempt_at and stored.next_attempt_at is not None
        assert outbox.counts(db) == {"sent": 1, "failed": 1}
    finally:
        db.close()
