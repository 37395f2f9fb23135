"""The fleet console (Textual Pilot) over two real nodes on one real sqld.

One calls board with a Node column, a nodes panel, actions that reach the call's own node,
drain from the panel, and a node killed with SIGKILL shown as down at once, its caller
re-routed (through a real webhook server) and back on the board under the other node.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fixtures import fleet
from fixtures.fleet import Fleet

from engine.audio.testsignal import speech_band_ulaw
from engine.bridge.simulator import PlacedCall, place_call
from engine.store import nodes
from xswarm_tui.app import XswarmApp
from xswarm_tui.fleet import FleetLink
from xswarm_tui.widgets.calls import CallBoard
from xswarm_tui.widgets.nodes import NodesPanel


async def _until(pilot: Any, predicate: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await pilot.pause(0.05)


def _calls_in_background(hooks_url: str, count: int, seconds: float) -> tuple[threading.Thread, list[PlacedCall]]:
    """Twilio's side of ``count`` calls, on a thread of its own (the app owns the test loop)."""
    placed: list[PlacedCall] = []
    audio = speech_band_ulaw(seconds, seed=3)

    async def run() -> None:
        placed.extend(
            await asyncio.gather(
                *(
                    place_call(hooks_url, fleet.TWILIO_TOKEN, audio, call_sid=f"CAF{i}", account_sid=fleet.ACCOUNT_SID)
                    for i in range(count)
                )
            )
        )

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    return thread, placed


def _cell(table: Any, row: str, column: str) -> str:
    return str(table.get_cell(row, column))


async def test_fleet_console_one_board_nodes_panel_actions_and_a_dead_node(fleet_db: Fleet) -> None:
    a, b = fleet_db.nodes("node-a", "node-b")
    hooks = fleet_db.webhooks()
    thread, placed = _calls_in_background(hooks.extra["url"], 2, 12.0)
    link = FleetLink([], fleet.SUPERVISOR_TOKEN, audio=lambda: "no audio device in tests", discover=_discover(fleet_db))
    app = XswarmApp(link)
    async with app.run_test(size=(160, 45)) as pilot:
        board = app.query_one(CallBoard)
        panel = app.query_one(NodesPanel)
        await _until(pilot, lambda: {"CAF0", "CAF1"} <= set(board.rows))
        where = {cid: _cell(board, cid, "node") for cid in ("CAF0", "CAF1")}
        assert sorted(where.values()) == ["node-a", "node-b"]  # one board, each call with its node
        await _until(pilot, lambda: set(panel.rows) == {"node-a", "node-b"})
        await _until(pilot, lambda: _cell(panel, "node-a", "live") == "1" and _cell(panel, "node-a", "free") == "3")
        assert _cell(panel, "node-b", "state") == "ready" and _cell(panel, "node-b", "version") != "—"
        assert _cell(panel, "node-a", "gpu") != "—"  # each node's GPU line (or why there is none)

        on_b = next(cid for cid, node in where.items() if node == "node-b")
        board.move_cursor(row=board.get_row_index(on_b))
        await pilot.press("m")  # mute goes to node-b, the only node that has this call
        await _until(pilot, lambda: _cell(board, on_b, "mode") == "MUTED")

        await pilot.press("n")
        panel.move_cursor(row=panel.get_row_index("node-b"))
        await pilot.press("d")  # drain node-b from the console
        await _until(pilot, lambda: _cell(panel, "node-b", "state") == "draining")
        assert nodes.get(fleet_db.db, "node-b").state == "draining"  # type: ignore[union-attr]
        await pilot.press("d")
        await _until(pilot, lambda: _cell(panel, "node-b", "state") == "ready")

        on_a = next(cid for cid, node in where.items() if node == "node-a")
        await asyncio.to_thread(a.kill)
        # down at once: the nodes table alone would say so only after 15 s
        await _until(pilot, lambda: _cell(panel, "node-a", "state") == "down", timeout=3.0)
        assert "node node-a down" in " ".join(item.text for item in app.state.feed)
        # Twilio asks the webhook what next; the caller comes back on node-b, same call id
        await _until(pilot, lambda: on_a in board.rows and _cell(board, on_a, "node") == "node-b")
    link.close()
    thread.join(timeout=30)
    moved = next(p for p in placed if p.call_sid == on_a)
    assert len(moved.legs) == 2 and moved.outcome == "completed"


def _discover(f: Fleet) -> Any:
    return lambda: [n.to_json() for n in nodes.list_nodes(f.db)]


async def test_attach_with_urls_names_nodes_from_their_snapshots_and_sees_a_stop(fleet_db: Fleet) -> None:
    a, b = fleet_db.nodes("node-a", "node-b")
    urls = [a.extra["supervisor_url"], b.extra["supervisor_url"]]
    link = FleetLink(urls, fleet.SUPERVISOR_TOKEN, audio=lambda: "no audio device in tests")
    app = XswarmApp(link)
    async with app.run_test(size=(160, 45)) as pilot:
        panel = app.query_one(NodesPanel)
        await _until(pilot, lambda: set(panel.rows) == {"node-a", "node-b"})
        assert "fleet: 2 nodes" in app.sub_title
        await asyncio.to_thread(b.stop)  # a clean stop: the node goes away all the same
        await _until(pilot, lambda: _cell(panel, "node-b", "state") == "down", timeout=3.0)
        assert _cell(panel, "node-a", "state") == "ready"
    link.close()


def test_attach_needs_a_ws_url_or_fleet(fleet_db: Fleet) -> None:
    missing = fleet_db.cli("attach", "--token", "t")
    assert missing.returncode == 2 and "give a supervisor URL, several, or --fleet" in missing.stderr
    bad = fleet_db.cli("attach", "ws://127.0.0.1:1", "http://x", "--token", "t")
    assert bad.returncode == 2 and "must start with ws://" in bad.stderr


async def test_fleet_console_skips_waiting_for_down_nodes_and_picks_up_new_ones(fleet_db: Fleet) -> None:
    fleet_db.nodes("node-a")
    fleet_db.db.write(
        "INSERT INTO nodes (id, supervisor_url, slots_total, slots_free, started_at, heartbeat_at)"
        " VALUES ('gone', 'ws://127.0.0.1:9', 4, 4, 0, 0)"
    )
    link = FleetLink([], fleet.SUPERVISOR_TOKEN, audio=lambda: "no audio device in tests", discover=_discover(fleet_db))
    app = XswarmApp(link)
    async with app.run_test(size=(160, 45)) as pilot:
        panel = app.query_one(NodesPanel)
        await _until(pilot, lambda: set(panel.rows) == {"node-a", "gone"}, timeout=5.0)
        await _until(pilot, lambda: _cell(panel, "node-a", "state") == "ready", timeout=5.0)
        assert _cell(panel, "gone", "state") == "down" and _cell(panel, "gone", "live") == "—"
        await asyncio.to_thread(fleet_db.nodes, "node-late")  # started after the console: joins it
        await _until(pilot, lambda: "node-late" in panel.rows and _cell(panel, "node-late", "state") == "ready")
    link.close()
