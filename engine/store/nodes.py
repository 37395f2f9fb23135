"""The ``nodes`` table: each runtime heartbeats its capacity; the voice webhook picks a node."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any

from engine.store.db import Database

HEARTBEAT_S = 5.0
STALE_AFTER_S = 3 * HEARTBEAT_S
"""A node whose heartbeat is older than this is considered gone."""


@dataclass(frozen=True)
class Node:
    id: str
    bridge_url: str | None
    model: str | None
    slots_total: int
    slots_free: int
    step_ms_p99: float | None
    heartbeat_at: int


def heartbeat(
    db: Database,
    node_id: str,
    *,
    bridge_url: str | None,
    model: str,
    slots_total: int,
    slots_free: int,
    step_ms_p99: float | None,
    started_at: int,
) -> concurrent.futures.Future[Any]:
    """Upsert this node's row (returns the write's future; the caller need not wait)."""
    now = int(time.time() * 1000)
    return db.submit(
        "INSERT INTO nodes (id, bridge_url, model, slots_total, slots_free, step_ms_p99, started_at, heartbeat_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(id) DO UPDATE SET bridge_url = excluded.bridge_url, model = excluded.model,"
        " slots_total = excluded.slots_total, slots_free = excluded.slots_free,"
        " step_ms_p99 = excluded.step_ms_p99, heartbeat_at = excluded.heartbeat_at",
        (node_id, bridge_url, model, slots_total, slots_free, step_ms_p99, started_at, now),
    )


def live_nodes(db: Database, now_ms: int | None = None) -> list[Node]:
    """Nodes with a fresh heartbeat, most free slots first."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    rows = db.query(
        "SELECT id, bridge_url, model, slots_total, slots_free, step_ms_p99, heartbeat_at FROM nodes"
        " WHERE heartbeat_at >= ? ORDER BY slots_free DESC, id",
        (now_ms - int(STALE_AFTER_S * 1000),),
    )
    return [Node(*row) for row in rows]


def choose_node(db: Database, now_ms: int | None = None) -> Node | None:
    """The live node with the most free slots, or None when every node is full or gone."""
    for node in live_nodes(db, now_ms):
        if node.slots_free > 0 and node.bridge_url:
            return node
    return None


def remove(db: Database, node_id: str) -> concurrent.futures.Future[Any]:
    return db.submit("DELETE FROM nodes WHERE id = ?", (node_id,))
