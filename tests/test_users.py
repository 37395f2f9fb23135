"""Users, API keys, tiers and the feed repository, on the file and on real sqld."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine import events
from engine.store import feed, migrations, users
from engine.store.db import Database, Target
from engine.tiers import TIERS, tier


@pytest.fixture
def db(store_target: Target) -> Iterator[Database]:
    with Database(store_target, batch_max_wait_ms=1) as database:
        migrations.migrate(database)
        yield database


def test_tiers_vocabulary() -> None:
    assert list(TIERS) == ["free", "personal", "professional", "enterprise", "admin"]
    assert tier("enterprise").voice_minutes is None
    assert tier("free").voice_minutes and tier("free").voice_minutes < tier("personal").voice_minutes  # type: ignore[operator]
    with pytest.raises(ValueError, match="valid tiers: free, personal"):
        tier("gold")


def test_create_find_and_update_user(db: Database) -> None:
    alice = users.create_user(db, name=" Alice ", phone="+14155550123", email="Alice@Example.com", tier="personal")
    assert alice.name == "Alice" and alice.tier == "personal" and alice.recording_consent is False
    assert users.get_user(db, alice.id) == alice
    assert users.find_by_phone(db, "+14155550123") == alice
    assert users.find_by_email(db, "alice@example.com") == alice  # case-insensitive
    assert users.lookup(db, "+14155550123") == alice and users.lookup(db, "nobody") is None
    users.set_tier(db, alice.id, "professional")
    users.set_stripe_customer(db, alice.id, "cus_123")
    users.set_recording_consent(db, alice.id, True)
    again = users.find_by_stripe_customer(db, "cus_123")
    assert again is not None and again.tier == "professional" and again.recording_consent is True
    assert again.updated_at >= alice.updated_at
    assert [u.id for u in users.list_users(db)] == [alice.id]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("phone", "4155550123", "not E.164"),
        ("phone", "+0155550123", "not E.164"),
        ("email", "alice@", "not a valid address"),
        ("email", "a b@example.com", "not a valid address"),
        ("name", "   ", "name must be"),
        ("tier", "gold", "unknown tier"),
    ],
)
def test_bad_input_is_refused_clearly(db: Database, field: str, value: str, message: str) -> None:
    fields = {"name": "Bob", "phone": "+442071234567", "email": "bob@example.org", "tier": "free"} | {field: value}
    with pytest.raises(ValueError, match=message):
        users.create_user(db, **fields)
    assert users.list_users(db) == []


def test_duplicates_and_unknown_ids(db: Database) -> None:
    bob = users.create_user(db, name="Bob", phone="+442071234567", email="bob@example.org")
    with pytest.raises(ValueError, match="phone \\+442071234567 already exists"):
        users.create_user(db, name="Bob 2", phone="+442071234567", email="other@example.org")
    with pytest.raises(ValueError, match="email BOB@example.org already exists"):
        users.create_user(db, name="Bob 3", phone="+442071234568", email="BOB@example.org")
    with pytest.raises(ValueError, match="no user"):
        users.set_tier(db, "missing", "free")
    with pytest.raises(ValueError, match="unknown tier"):
        users.set_tier(db, bob.id, "gold")
    carol = users.create_user(db, name="Carol", phone="+442071234569", email="carol@example.org")
    users.set_stripe_customer(db, bob.id, "cus_b")
    with pytest.raises(ValueError, match="already belongs"):
        users.set_stripe_customer(db, carol.id, "cus_b")


def test_api_keys_are_shown_once_hashed_and_revocable(db: Database) -> None:
    dave = users.create_user(db, name="Dave", phone="+33142685300", email="dave@example.fr")
    key_id, key = users.create_api_key(db, dave.id)
    assert key.startswith("xsk_") and len(key) > 40
    stored = db.query("SELECT prefix, hash FROM api_keys WHERE id = ?", (key_id,))
    assert stored[0][0] == key[:12] and key not in stored[0][1]
    assert users.user_for_api_key(db, key) == dave
    assert users.user_for_api_key(db, key + "x") is None
    assert users.user_for_api_key(db, "not-a-key") is None
    second_id, second = users.create_api_key(db, dave.id)
    assert users.revoke_api_key(db, key[:12]) is True
    assert users.user_for_api_key(db, key) is None
    assert users.revoke_api_key(db, key_id) is False  # already revoked
    assert users.user_for_api_key(db, second) == dave
    assert [k.revoked_at is not None for k in users.list_api_keys(db, dave.id)] == [True, False]
    assert users.revoke_api_key(db, second_id) is True
    with pytest.raises(ValueError, match="no user"):
        users.create_api_key(db, "missing")


def test_feed_keeps_events_newest_first_and_masks_callers(db: Database) -> None:
    def record(event: events.Event) -> None:  # what the runtime's feed subscriber does
        if feed.keeps(event):
            feed.append_event(db, event)

    record(events.CallStarted(call_id="CA1", slot=0, source="twilio", caller="+14155550123"))
    record(events.LatencySampled(call_id="CA1", step_ms=40.0))  # samples never reach the feed
    record(events.ModelStatusChanged(model="echo", state="loading", progress=0.5))  # nor load progress
    record(events.UserCreated(user_id="u1", name="Alice", tier="free"))
    feed.append(db, type="Note", summary="hello", call_id="CA1", payload={"k": 1}).result(timeout=30)
    entries = feed.recent(db, 10)
    assert [e.type for e in entries] == ["Note", "UserCreated", "CallStarted"]
    started = entries[2]
    assert started.call_id == "CA1" and "+1415•••0123" in (started.summary or "")
    assert "+14155550123" not in (started.summary or "") and started.payload and started.payload["slot"] == 0
    assert [e.type for e in feed.recent(db, 10, call_id="CA1")] == ["Note", "CallStarted"]
    assert [e.type for e in feed.recent(db, 10, before_id=entries[0].id)] == ["UserCreated", "CallStarted"]
    assert feed.prune(db, started.at + 1) >= 1
