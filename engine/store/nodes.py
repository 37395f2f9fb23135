"""The ``nodes`` table: every runtime of a fleet is one row in the shared database.

A node writes its row at start (``register``) and every ``HEARTBEAT_S`` after (``heartbeat``):
public bridge and supervisor URLs, model, slots, step p99, version. The operator writes one
column, ``state`` (``ready`` or ``draining``, through ``xswarm nodes drain|resume`` from any
machine that reaches the database); the node reads it back with each heartbeat, so a change
takes effect within one heartbeat. ``down`` is never stored: it is a heartbeat older than
``STALE_AFTER_S`` (a node killed without a clean stop leaves such a row; ``forget`` removes it).

Two processes must never share a node id (their calls, reservations and drain state would
mix), so each process holds its row with an ``instance`` id: a heartbeat only updates the row
of its own instance, or a row whose holder is gone (stale heartbeat, or a dead process on the
same host); otherwise it raises ``NodeIdTaken``.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from engine.store.db import Database, StoreError

HEARTBEAT_S = 5.0
STALE_AFTER_S = 3 * HEARTBEAT_S
"""A node whose heartbeat is older than this is down."""

State = Literal["ready", "draining", "down"]
ADMIN_STATES = ("ready", "draining")

_BRIDGE_URL = re.compile(r"^wss?://[A-Za-z0-9\[][^\s\"'<>\\^`{|}]*$")
BRIDGE_URL_SQL = (
    "(bridge_url GLOB 'ws://[A-Za-z0-9[]*' OR bridge_url GLOB 'wss://[A-Za-z0-9[]*')"
    " AND bridge_url NOT GLOB '*[ \"''<>\\^`{|}]*'"
    " AND bridge_url NOT GLOB ('*' || char(9) || '*') AND bridge_url NOT GLOB ('*' || char(10) || '*')"
)
"""``valid_bridge_url`` in SQL, so routing never picks a row with a bad URL whoever wrote it."""


class NodeIdTaken(StoreError):
    """Another live process already holds this node id."""


def valid_bridge_url(url: str | None) -> bool:
    """A ws:// or wss:// URL with a host and nothing Twilio or XML could choke on."""
    return bool(url) and bool(_BRIDGE_URL.match(url or ""))


def now_ms() -> int:
    return int(time.time() * 1000)


def new_instance() -> str:
    """``host:pid:random``: which process holds a node id, so a restart on the same host can
    tell a dead holder (``release_if_dead``) from a live one."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


def release_if_dead(db: Database, node_id: str) -> bool:
    """Free ``node_id`` when its holder was a process on THIS host that no longer runs (a
    node killed and restarted at once need not wait ``STALE_AFTER_S``). True when freed.
    A holder on another host, or a pid that is alive (even a reused one), is left alone."""
    rows = db.query("SELECT instance FROM nodes WHERE id = ?", (node_id,))
    holder = str(rows[0][0]) if rows and rows[0][0] else ""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        pass
    except PermissionError:
        return False  # alive, another user's
    else:
        return False
    return bool(
        db.write(
            "UPDATE nodes SET instance = NULL WHERE id = ? AND instance = ? RETURNING id",
            (node_id, holder),
            returning=True,
        )
    )


@dataclass(frozen=True)
class Node:
    """One row as the operator sees it (``xswarm nodes list --json`` prints ``asdict``)."""

    node_id: str
    state: State
    live_calls: int
    free_slots: int
    slots_total: int
    reserved: int
    """Calls routed here that have not connected yet."""
    bridge_url: str | None
    supervisor_url: str | None
    model: str | None
    step_ms_p99: float | None
    version: str | None
    started_at: int
    last_seen_s: float
    bridge_url_ok: bool
    suspect: bool
    """A call here dropped without ending normally and no heartbeat came since."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_UPSERT = (
    "INSERT INTO nodes (id, bridge_url, supervisor_url, model, version, slots_total, slots_free, live_calls,"
    " step_ms_p99, started_at, heartbeat_at, instance)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(id) DO UPDATE SET bridge_url = excluded.bridge_url, supervisor_url = excluded.supervisor_url,"
    " model = excluded.model, version = excluded.version, slots_total = excluded.slots_total,"
    " slots_free = excluded.slots_free, live_calls = excluded.live_calls, step_ms_p99 = excluded.step_ms_p99,"
    " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, instance = excluded.instance"
    " WHERE nodes.instance IS excluded.instance OR nodes.instance IS NULL OR nodes.heartbeat_at < ?"
    " RETURNING state"
)


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
    supervisor_url: str | None = None,
    version: str | None = None,
    live_calls: int = 0,
    instance: str | None = None,
) -> concurrent.futures.Future[Any]:
    """Write this node's row (insert or update) and read back the operator's ``state``.

    The future resolves to ``"ready"`` or ``"draining"``, or fails with ``NodeIdTaken`` when
    another live instance holds ``node_id``. The caller need not wait for it."""
    now = now_ms()
    future = db.submit(
        _UPSERT,
        (
            node_id,
            bridge_url,
            supervisor_url,
            model,
            version,
            slots_total,
            slots_free,
            live_calls,
            step_ms_p99,
            started_at,
            now,
            instance,
            now - int(STALE_AFTER_S * 1000),
        ),
        returning=True,
    )
    out: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def convert(done: concurrent.futures.Future[Any]) -> None:
        exc = done.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        rows = done.result()
        if not rows:
            out.set_exception(
                NodeIdTaken(
                    f"node id {node_id!r} is held by another live process; give this node its own XSWARM_NODE_ID"
                    f" (or wait {STALE_AFTER_S:.0f} s after that process died)"
                )
            )
        else:
            out.set_result(rows[0][0])

    future.add_done_callback(convert)
    return out


_SELECT = (
    "SELECT n.id, n.state, n.live_calls, n.slots_free, n.slots_total,"
    " (SELECT COUNT(*) FROM route_reservations r WHERE r.node_id = n.id AND r.expires_at > ?),"
    " n.bridge_url, n.supervisor_url, n.model, n.step_ms_p99, n.version, n.started_at, n.heartbeat_at, n.suspect_at"
    " FROM nodes n"
)


def _node(row: tuple[Any, ...], now: int) -> Node:
    (node_id, state, live, free, total, reserved, bridge, supervisor, model, p99, version, started, beat, suspect) = row
    down = beat < now - int(STALE_AFTER_S * 1000)
    return Node(
        node_id=node_id,
        state="down" if down else ("draining" if state == "draining" else "ready"),
        live_calls=int(live or 0),
        free_slots=int(free or 0),
        slots_total=int(total or 0),
        reserved=int(reserved or 0),
        bridge_url=bridge,
        supervisor_url=supervisor,
        model=model,
        step_ms_p99=p99,
        version=version,
        started_at=int(started or 0),
        last_seen_s=round(max(0, now - beat) / 1000, 1),
        bridge_url_ok=valid_bridge_url(bridge),
        suspect=suspect is not None and suspect >= beat,
    )


def list_nodes(db: Database, now: int | None = None) -> list[Node]:
    """Every row, live or not, by id."""
    moment = now if now is not None else now_ms()
    return [_node(row, moment) for row in db.query(_SELECT + " ORDER BY n.id", (moment,))]


def get(db: Database, node_id: str, now: int | None = None) -> Node | None:
    moment = now if now is not None else now_ms()
    rows = db.query(_SELECT + " WHERE n.id = ?", (moment, node_id))
    return _node(rows[0], moment) if rows else None


def live_nodes(db: Database, now: int | None = None) -> list[Node]:
    """Nodes with a fresh heartbeat (ready or draining), most free slots first."""
    live = [n for n in list_nodes(db, now) if n.state != "down"]
    return sorted(live, key=lambda n: (-n.free_slots, n.node_id))


def set_state(db: Database, node_id: str, state: Literal["ready", "draining"]) -> bool:
    """The operator's drain or resume; False when there is no such node."""
    if state not in ADMIN_STATES:
        raise ValueError(f"state must be one of {', '.join(ADMIN_STATES)}")
    rows = db.write("UPDATE nodes SET state = ? WHERE id = ? RETURNING id", (state, node_id), returning=True)
    return bool(rows)


def forget(db: Database, node_id: str) -> bool:
    """Remove a row (and its reservations); False when there is no such node."""
    rows = db.write("DELETE FROM nodes WHERE id = ? RETURNING id", (node_id,), returning=True)
    db.write("DELETE FROM route_reservations WHERE node_id = ?", (node_id,))
    return bool(rows)


def remove(db: Database, node_id: str, instance: str | None = None) -> concurrent.futures.Future[Any]:
    """A node's clean stop takes its own row away (not a row another instance took over)."""
    if instance is None:
        return db.submit("DELETE FROM nodes WHERE id = ?", (node_id,))
    return db.submit("DELETE FROM nodes WHERE id = ? AND instance = ?", (node_id, instance))
