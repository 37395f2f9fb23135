"""Which node takes a call: one atomic choose-and-reserve in the shared database.

Why a reservation: a node's free slots only change when a call connects there (and its
heartbeat says so), a second or more after the webhook answered. Ten calls arriving in the
same second would all see the same "emptiest" node. So the choice and a row in
``route_reservations`` are ONE statement: each call routed to a node but not yet streaming
counts against that node's free slots, for every webhook process on every host (the statement
runs in a write transaction, which the database serializes). A reservation ends when the call
connects (the node deletes it with the heartbeat that counts the call), when Twilio reports
the call ended, or when the call token it was made for expires.

Never chosen: a node that is ``draining``, ``down`` (stale heartbeat), ``suspect`` (a call there
dropped without ending normally and no heartbeat came since), full once reservations count, or
whose bridge URL is not a clean ws:// or wss:// URL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.store.db import Database
from engine.store.nodes import BRIDGE_URL_SQL, STALE_AFTER_S, now_ms

if TYPE_CHECKING:
    import aiohttp


@dataclass(frozen=True)
class Route:
    node_id: str
    bridge_url: str


def _reserve_sql(excluded: int) -> str:
    not_in = f" AND n.id NOT IN ({','.join('?' * excluded)})" if excluded else ""
    return (
        "INSERT INTO route_reservations (call_sid, node_id, reserved_at, expires_at)"
        " SELECT ?, id, ?, ? FROM ("
        "  SELECT n.id AS id, n.bridge_url AS bridge_url, n.step_ms_p99 AS p99, n.slots_free - ("
        "   SELECT COUNT(*) FROM route_reservations r"
        "   WHERE r.node_id = n.id AND r.expires_at > ? AND r.call_sid != ?) AS room"
        "  FROM nodes n"
        "  WHERE n.state = 'ready' AND n.heartbeat_at >= ?"
        "  AND (n.suspect_at IS NULL OR n.suspect_at < n.heartbeat_at)"
        f"  AND {BRIDGE_URL_SQL.replace('bridge_url', 'n.bridge_url')}{not_in}"
        " ) WHERE room > 0 ORDER BY room DESC, COALESCE(p99, 0), id LIMIT 1"
        " ON CONFLICT(call_sid) DO UPDATE SET node_id = excluded.node_id,"
        " reserved_at = excluded.reserved_at, expires_at = excluded.expires_at"
        " RETURNING node_id, (SELECT bridge_url FROM nodes WHERE nodes.id = route_reservations.node_id)"
    )


async def reserve(
    db: Database,
    call_sid: str,
    *,
    ttl_s: float,
    session: aiohttp.ClientSession,
    exclude: Sequence[str] = (),
    now: int | None = None,
) -> Route | None:
    """Choose a node for ``call_sid`` and hold one of its slots for ``ttl_s``; None when no
    node has room. A repeated call for the same CallSid (a retried webhook, a re-route)
    moves its one reservation rather than adding another: the statement is safe to repeat.

    Remote database: one HTTP request of its own on ``session`` (``engine.store.hrana``: the
    decision is on the caller's answer path). Embedded file: the writer's queue, where it
    takes well under a millisecond."""
    moment = now if now is not None else now_ms()
    params = (
        call_sid,
        moment,
        moment + int(ttl_s * 1000),
        moment,
        call_sid,
        moment - int(STALE_AFTER_S * 1000),
        *exclude,
    )
    sql = _reserve_sql(len(exclude))
    if db.target.remote:
        from engine.store import hrana  # the runtime imports this module; only webhooks route

        rows = await hrana.execute(session, db.target, sql, params)
    else:
        rows = await asyncio.wrap_future(db.submit(sql, params, returning=True))
    return Route(rows[0][0], rows[0][1]) if rows else None


def release_statement(call_sid: str) -> tuple[str, tuple[Any, ...]]:
    """The call's reservation stops counting: it is streaming on its node (which now counts
    it), or it ended before it got there (the caller hung up while it rang)."""
    return "DELETE FROM route_reservations WHERE call_sid = ?", (call_sid,)


def expired_statement(now: int | None = None) -> tuple[str, tuple[Any, ...]]:
    """Reservations whose token has expired (the caller never reached the node)."""
    return "DELETE FROM route_reservations WHERE expires_at <= ?", (now if now is not None else now_ms(),)


def reserved_node(db: Database, call_sid: str) -> str | None:
    rows = db.query("SELECT node_id FROM route_reservations WHERE call_sid = ?", (call_sid,))
    return str(rows[0][0]) if rows else None


def mark_suspect(db: Database, node_id: str, now: int | None = None) -> concurrent.futures.Future[Any]:
    """A call on ``node_id`` dropped without ending normally: route nothing there until its
    next heartbeat shows it alive."""
    return db.submit("UPDATE nodes SET suspect_at = ? WHERE id = ?", (now if now is not None else now_ms(), node_id))
