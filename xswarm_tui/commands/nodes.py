"""``xswarm nodes list|show|drain|resume|forget``: the fleet as rows of the shared database.

Works from any machine that reaches the database (``TURSO_DATABASE_URL``). Drain and resume
write the node's ``state``; the node reads it back with its next heartbeat (within
``HEARTBEAT_S``) and says so in its events feed, while the voice webhook stops (or resumes)
routing calls there at once. An unknown node is one line on stderr and exit 1.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer

from xswarm_tui.commands._common import EXIT_FAILED, database, fail

if TYPE_CHECKING:
    from engine.store.nodes import Node

app = typer.Typer(
    help="Nodes of the fleet: list, drain for maintenance, resume, forget dead ones.", no_args_is_help=True
)


def _unknown(node_id: str) -> None:
    fail(f"no node {node_id!r} (see `xswarm nodes list`)", EXIT_FAILED)


def _p99(node: Node) -> str:
    return f"{node.step_ms_p99:.1f}" if node.step_ms_p99 is not None else "-"


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per node.")) -> None:
    """Every node: state, live calls, free slots, step p99, last heartbeat, URLs."""
    from engine.store.nodes import list_nodes

    with database() as db:
        rows = list_nodes(db)
    if as_json:
        typer.echo(json.dumps([n.to_json() for n in rows]))
        return
    if not rows:
        typer.echo("no nodes (a node appears once `xswarm serve` or `xswarm` runs against this database)")
        return
    typer.echo(f"{'NODE':<20} {'STATE':<9} {'LIVE':>4} {'FREE':>4} {'P99 MS':>7} {'SEEN':>7}  BRIDGE")
    for n in rows:
        state = n.state + ("?" if n.suspect else "")
        bridge = (n.bridge_url or "-") + ("" if n.bridge_url_ok else " (bad URL: never routed to)")
        seen = f"{n.last_seen_s:.0f}s"
        typer.echo(f"{n.node_id:<20} {state:<9} {n.live_calls:>4} {n.free_slots:>4} {_p99(n):>7} {seen:>7}  {bridge}")


@app.command()
def show(node_id: str = typer.Argument(..., help="The node's XSWARM_NODE_ID.")) -> None:
    """One node in full, as JSON."""
    from engine.store.nodes import get

    with database() as db:
        node = get(db, node_id)
    if node is None:
        _unknown(node_id)
        return
    data = node.to_json()
    data["started"] = datetime.fromtimestamp(node.started_at / 1000, tz=UTC).isoformat(timespec="seconds")
    typer.echo(json.dumps(data, indent=2))


def _set(node_id: str, state: str) -> None:
    from engine.store.nodes import HEARTBEAT_S, get, set_state

    with database() as db:
        if not set_state(db, node_id, state):  # type: ignore[arg-type]
            _unknown(node_id)
        node = get(db, node_id)
    live = node.live_calls if node else 0
    if state == "draining":
        typer.echo(
            f"node {node_id} draining: no new calls are routed to it; its {live} live calls finish"
            f" (the node confirms within {HEARTBEAT_S:.0f} s in its events feed)"
        )
    else:
        typer.echo(f"node {node_id} ready: takes new calls again")
    if node is not None and node.state == "down":
        typer.echo(f"note: node {node_id} is down (last heartbeat {node.last_seen_s:.0f} s ago)")


@app.command()
def drain(node_id: str = typer.Argument(..., help="The node's XSWARM_NODE_ID.")) -> None:
    """Take a node out of rotation: no new calls, live calls finish."""
    _set(node_id, "draining")


@app.command()
def resume(node_id: str = typer.Argument(..., help="The node's XSWARM_NODE_ID.")) -> None:
    """Put a drained node back into rotation."""
    _set(node_id, "ready")


@app.command()
def forget(
    node_id: str = typer.Argument(..., help="The node's XSWARM_NODE_ID."),
    force: bool = typer.Option(False, "--force", help="Remove the row even though the node looks alive."),
) -> None:
    """Remove a dead node's row (a node that stops cleanly removes its own)."""
    from engine.store.nodes import forget as forget_row
    from engine.store.nodes import get

    with database() as db:
        node = get(db, node_id)
        if node is None:
            _unknown(node_id)
            return
        if node.state != "down" and not force:
            fail(
                f"node {node_id} is {node.state} (heartbeat {node.last_seen_s:.0f} s ago); "
                "stop it first, or use --force (a live node writes its row back at its next heartbeat)",
                EXIT_FAILED,
            )
        forget_row(db, node_id)
    typer.echo(f"forgot node {node_id}")
