"""Several real nodes (``xswarm serve``, echo model) and webhook servers on one real sqld.

What an operator relies on: nodes register and list themselves, a second process cannot take
a live node's id, a burst of calls spreads over the nodes, a drained node gets no call and
says so in its feed within one heartbeat, a node killed mid-call loses no caller (Twilio's
``<Connect action>`` re-routes them), and webhook events are applied exactly once however
many webhook servers share the database.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fixtures import fleet
from fixtures.fleet import Fleet, wait_until
from fixtures.sqld import SqldServer

from engine.audio.testsignal import speech_band_ulaw
from engine.bridge.simulator import PlacedCall, parse_twiml, place_call, sign
from engine.store import nodes
from engine.store.db import Database
from engine.store.migrations import migrate


async def ring(hooks_url: str, call_sid: str, caller: str = "+15005550100") -> str:
    """One signed voice webhook as Twilio sends it; returns the TwiML."""
    import aiohttp

    url = hooks_url + "/twilio/voice"
    form = {"CallSid": call_sid, "AccountSid": fleet.ACCOUNT_SID, "From": caller, "To": "+15005550007"}
    form["CallStatus"] = "ringing"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url, data=form, headers={"X-Twilio-Signature": sign(fleet.TWILIO_TOKEN, url, form)}
        ) as r:
            assert r.status == 200
            return await r.text()


async def burst(hooks_url: str, prefix: str, count: int) -> list[str]:
    """``count`` calls at once; the bridge URL each TwiML streams to."""
    answers = await asyncio.gather(*(ring(hooks_url, f"CA{prefix}{i:04d}") for i in range(count)))
    return [parse_twiml(text).url for text in answers]


def feed_states(db: Database, node_id: str) -> list[str]:
    rows = db.query("SELECT payload FROM events WHERE type = 'NodeStateChanged' ORDER BY id")
    return [json.loads(p)["state"] for (p,) in rows if json.loads(p)["node_id"] == node_id]


# ---------------------------------------------------------------------------------- tests


def test_nodes_register_list_and_a_taken_id_refuses_to_start(fleet_db: Fleet) -> None:
    a, b = fleet_db.nodes("node-a", "node-b")
    result = fleet_db.cli("nodes", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = {item["node_id"]: item for item in json.loads(result.stdout)}
    assert set(listed) == {"node-a", "node-b"}
    for proc in (a, b):
        item = listed[proc.name]
        assert item["state"] == "ready" and item["live_calls"] == 0 and item["free_slots"] == 4
        assert item["bridge_url"] == proc.extra["bridge_url"]
        assert item["supervisor_url"] == proc.extra["supervisor_url"]
        assert 0 <= item["last_seen_s"] <= nodes.HEARTBEAT_S + 1
    twin = fleet.node(fleet_db.sqld.url, fleet_db.root, "node-a")
    run = subprocess.run(
        [sys.executable, "-m", "xswarm_tui.cli", *twin.args], env=twin.env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "node id 'node-a' is held by another live process" in run.stderr
    assert fleet_db.cli("nodes", "show", "node-b").returncode == 0
    for command in ("show", "drain", "resume", "forget"):
        unknown = fleet_db.cli("nodes", command, "no-such-node")
        assert (
            unknown.returncode == 1 and unknown.stderr == "xswarm: no node 'no-such-node' (see `xswarm nodes list`)\n"
        )
    refused = fleet_db.cli("nodes", "forget", "node-a")
    assert refused.returncode == 1 and "stop it first" in refused.stderr
    a.stop()
    assert [n.node_id for n in nodes.list_nodes(fleet_db.db)] == ["node-b"]  # a clean stop takes its row away


def test_bursts_spread_and_drain_and_resume_take_effect_within_a_heartbeat(fleet_db: Fleet) -> None:
    procs = fleet_db.nodes("node-a", "node-b", "node-c", slots=8)
    url = {p.name: p.extra["bridge_url"] + "/twilio" for p in procs}
    by_url = {v: k for k, v in url.items()}
    hooks = fleet_db.webhooks()
    base = hooks.extra["url"]
    first = Counter(by_url[u] for u in asyncio.run(burst(base, "A", 9)))
    assert first == {"node-a": 3, "node-b": 3, "node-c": 3}  # not all on the one that looked emptiest

    drained = fleet_db.cli("nodes", "drain", "node-b")
    assert drained.returncode == 0, drained.stderr
    asked = time.monotonic()
    second = Counter(by_url[u] for u in asyncio.run(burst(base, "B", 6)))
    assert second == {"node-a": 3, "node-c": 3}  # a draining node gets nothing, though it has the most room
    wait_until(lambda: feed_states(fleet_db.db, "node-b") == ["draining"], timeout=nodes.HEARTBEAT_S + 1)
    assert time.monotonic() - asked <= nodes.HEARTBEAT_S + 1
    assert json.loads(fleet_db.cli("nodes", "list", "--json").stdout)[1]["state"] == "draining"

    resumed = fleet_db.cli("nodes", "resume", "node-b")
    assert resumed.returncode == 0, resumed.stderr
    asked = time.monotonic()
    third = Counter(by_url[u] for u in asyncio.run(burst(base, "C", 3)))
    assert third == {"node-b": 3}  # back in rotation, and now the emptiest
    wait_until(lambda: feed_states(fleet_db.db, "node-b") == ["draining", "ready"], timeout=nodes.HEARTBEAT_S + 1)
    assert time.monotonic() - asked <= nodes.HEARTBEAT_S + 1


def test_a_row_with_a_bad_url_is_never_chosen(fleet_db: Fleet) -> None:
    fleet_db.nodes("node-a", slots=2)
    nodes.heartbeat(
        fleet_db.db,
        "bad-url",
        bridge_url="ws://bad host/<x>",
        model="echo",
        slots_total=64,
        slots_free=64,
        step_ms_p99=None,
        started_at=0,
    ).result()
    hooks = fleet_db.webhooks()
    targets = asyncio.run(burst(hooks.extra["url"], "U", 2))
    assert all(t.startswith(fleet_db.procs[0].extra["bridge_url"]) for t in targets)
    third = asyncio.run(ring(hooks.extra["url"], "CAU9"))
    assert "<Record" in third and "<Connect" not in third  # full: voicemail, never the bad row
    listed = {n["node_id"]: n for n in json.loads(fleet_db.cli("nodes", "list", "--json").stdout)}
    assert listed["bad-url"]["bridge_url_ok"] is False


def test_sigkill_mid_call_reroutes_the_caller_to_another_node(fleet_db: Fleet) -> None:
    a, b = fleet_db.nodes("node-a", "node-b")
    hooks = fleet_db.webhooks()
    audio = speech_band_ulaw(5.0, seed=12)

    async def scenario() -> tuple[list[PlacedCall], str]:
        calls = [
            asyncio.create_task(
                place_call(
                    hooks.extra["url"], fleet.TWILIO_TOKEN, audio, call_sid=f"CAK{i}", account_sid=fleet.ACCOUNT_SID
                )
            )
            for i in range(2)
        ]
        # both calls live (one per node), then node-a dies without a word
        await asyncio.to_thread(wait_until, lambda: sum(n.live_calls for n in nodes.live_nodes(fleet_db.db)) == 2)
        await asyncio.to_thread(a.kill)
        placed = await asyncio.gather(*calls)
        after = await ring(hooks.extra["url"], "CAK9")
        return list(placed), parse_twiml(after).url

    placed, later = asyncio.run(scenario())
    a_url, b_url = a.extra["bridge_url"] + "/twilio", b.extra["bridge_url"] + "/twilio"
    moved = next(p for p in placed if p.nodes[0] == a_url)
    stayed = next(p for p in placed if p.nodes[0] == b_url)
    assert moved.outcome == "completed" and moved.nodes == [a_url, b_url]
    assert moved.reroute_s and moved.reroute_s[0] <= 3.0
    assert moved.said.startswith("Sorry, we lost the line")
    assert sum(leg.chunks_sent for leg in moved.legs) >= len(audio) // 160  # the whole message reached a node
    assert stayed.outcome == "completed" and stayed.nodes == [b_url]  # ended normally: not re-routed
    assert later == b_url  # the dead node gets no new call though its heartbeat is still fresh
    wait_until(
        lambda: fleet_db.db.query("SELECT legs, node_id FROM calls WHERE id = ?", (moved.call_sid,)) == [(2, "node-b")]
    )


def test_webhook_events_apply_exactly_once_across_two_servers(fleet_db: Fleet) -> None:
    """Each status callback is delivered to BOTH servers at once (a retry landing on another
    box); both servers' processors claim from the one sqld."""
    import aiohttp

    from engine.store.users import create_user

    user = create_user(fleet_db.db, name="Alice", phone="+14155550101", email="alice@example.com", tier="professional")
    one, two = fleet_db.webhooks("hooks-1"), fleet_db.webhooks("hooks-2")
    count = 30

    async def deliver() -> None:
        async with aiohttp.ClientSession() as session:

            async def post(base: str, form: dict[str, str]) -> None:
                url = base + "/twilio/voice/status"
                headers = {"X-Twilio-Signature": sign(fleet.TWILIO_TOKEN, url, form)}
                async with session.post(url, data=form, headers=headers) as response:
                    assert response.status == 204

            jobs = []
            for i in range(count):
                form = {
                    "CallSid": f"CAX{i:04d}",
                    "AccountSid": fleet.ACCOUNT_SID,
                    "From": user.phone or "",
                    "CallStatus": "completed",
                    "CallDuration": "60",
                    "SequenceNumber": "4",
                }
                jobs += [post(one.extra["url"], form), post(two.extra["url"], form)]
            await asyncio.gather(*jobs)

    asyncio.run(deliver())
    db = fleet_db.db
    wait_until(lambda: db.query("SELECT COUNT(*) FROM webhook_inbox WHERE status = 'done'") == [(count,)])
    assert db.query("SELECT COUNT(*), MAX(attempts) FROM webhook_inbox") == [(count, 1)]  # each claimed once
    assert db.query("SELECT voice_seconds FROM usage WHERE user_id = ?", (user.id,)) == [(60.0 * count,)]
    assert db.query("SELECT COUNT(*) FROM usage_ledger") == [(count,)]
    assert db.query("SELECT COUNT(*) FROM events WHERE type = 'WebhookReceived'") == [(count,)]
    assert db.query("SELECT COUNT(*) FROM calls WHERE status = 'ended' AND duration_s = 60") == [(count,)]


async def test_a_processor_whose_lease_expired_cannot_commit_over_the_next_one(sqld: SqldServer) -> None:
    """Two webhook boxes on one sqld: box A claims a row and is slow past its lease; box B
    claims it again and applies it. A's late result must not be applied a second time."""
    from engine.events import EventBus, WebhookReceived
    from engine.store import inbox
    from tests.webhooks_support import make_settings
    from webhooks.hub import Hub, Outcome
    from webhooks.processor import InboxProcessor

    box_a, box_b = Database(sqld.target()).start(), Database(sqld.target()).start()
    migrate(box_a)
    claimed = asyncio.Event()

    def effect_of(name: str, delay_s: float) -> Any:
        async def effect(hub: Any, row: inbox.InboxRow) -> Outcome:
            claimed.set()
            await asyncio.sleep(delay_s)
            note = ("INSERT INTO events (at, type, summary) VALUES (?, ?, ?)", (1, "Note", name))
            return Outcome([note], [WebhookReceived("test", "t", name)])

        return effect

    inbox.put(box_a, "test", "e1", "t", "{}").result()
    slow = InboxProcessor(Hub(make_settings(), box_a, EventBus()), {"test": effect_of("A", 1.5)}, lease_ms=300)
    quick = InboxProcessor(Hub(make_settings(), box_b, EventBus()), {"test": effect_of("B", 0.0)}, poll_s=0.1)
    slow.start()
    try:
        await asyncio.wait_for(claimed.wait(), 10)
        quick.start()
        await asyncio.sleep(2.5)  # B claims after A's lease, commits; then A's effect finishes
    finally:
        await slow.stop()
        await quick.stop()
    try:
        assert box_a.query("SELECT summary FROM events WHERE type = 'Note'") == [("B",)]
        assert box_a.query("SELECT status, attempts, last_error FROM webhook_inbox") == [("done", 2, None)]
    finally:
        box_a.close()
        box_b.close()


async def test_routing_spreads_and_excludes_on_every_store(store_target: Any) -> None:
    """The choose-and-reserve statement on the embedded file, sqld, and sqld with JWT auth
    (the remote ones through one HTTP request of its own)."""
    import aiohttp

    from engine.store import routing

    db = Database(store_target).start()
    migrate(db)
    try:
        for name in ("a", "b"):
            nodes.heartbeat(
                db,
                name,
                bridge_url=f"wss://{name}.example.com",
                model="echo",
                slots_total=2,
                slots_free=2,
                step_ms_p99=None,
                started_at=0,
            ).result()
        async with aiohttp.ClientSession() as session:
            routes = await asyncio.gather(*(routing.reserve(db, f"CA{i}", ttl_s=60, session=session) for i in range(4)))
            assert Counter(r.node_id for r in routes if r) == {"a": 2, "b": 2}
            assert await routing.reserve(db, "CA9", ttl_s=60, session=session) is None  # every slot reserved
            nodes.heartbeat(
                db,
                "b",
                bridge_url="wss://b.example.com",
                model="echo",
                slots_total=3,
                slots_free=3,
                step_ms_p99=None,
                started_at=0,
            ).result()
            moved = await routing.reserve(db, "CA0", ttl_s=60, session=session, exclude=("a",))
            assert moved is not None and moved.node_id == "b"  # a re-route never goes back where it was
            expired = await routing.reserve(db, "CA8", ttl_s=60, session=session, now=nodes.now_ms() + 120_000)
            assert expired is None  # a minute later the heartbeats are stale: every node is down
    finally:
        db.close()


def test_a_node_with_a_bad_public_bridge_url_refuses_to_start(tmp_path: Path) -> None:
    env = fleet.fleet_env("http://127.0.0.1:9", tmp_path, XSWARM_BRIDGE_PUBLIC_URL="wss://gpu1 example.com")
    run = subprocess.run(
        [sys.executable, "-m", "xswarm_tui.cli", "serve", "--model", "echo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "XSWARM_BRIDGE_PUBLIC_URL" in run.stderr and "must be a ws:// or wss:// URL" in run.stderr


def test_a_node_killed_and_restarted_at_once_takes_its_id_back(fleet_db: Fleet) -> None:
    """Its old row still looks alive for 15 s, but its holder is a dead process on this host."""
    (a,) = fleet_db.nodes("node-a")
    a.kill()
    again = fleet.node(fleet_db.sqld.url, fleet_db.root, "node-a").start()
    fleet_db.procs.append(again)
    again.wait_ready()
    wait_until(lambda: nodes.get(fleet_db.db, "node-a").bridge_url == again.extra["bridge_url"])  # type: ignore[union-attr]


async def test_routing_survives_the_database_server_restarting_between_calls(sqld: SqldServer) -> None:
    """The webhook's HTTP session keeps its connections to sqld open between calls; after the
    server restarts, the next decision is still made."""
    import aiohttp

    from engine.store import routing

    db = Database(sqld.target()).start()
    migrate(db)
    try:
        nodes.heartbeat(
            db,
            "a",
            bridge_url="wss://a.example.com",
            model="echo",
            slots_total=4,
            slots_free=4,
            step_ms_p99=None,
            started_at=0,
        ).result()
        async with aiohttp.ClientSession() as session:
            assert await routing.reserve(db, "CA1", ttl_s=60, session=session) is not None
            await asyncio.to_thread(sqld.restart)
            route = await routing.reserve(db, "CA2", ttl_s=60, session=session)
            assert route is not None and route.node_id == "a"
    finally:
        db.close()
