"""The nodes panel of the fleet console: one row per node, redrawn once a second.

Columns: state (ready, draining, down), live and free slots, step p99, how long ago the node
last said anything, version, and its GPU line. ``d`` drains the selected node or resumes it
(the command goes to that node's own supervisor socket, which writes the shared ``nodes`` row
as ``xswarm nodes drain|resume`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from engine import events as ev
from xswarm_tui.link import LinkError

COLUMNS = (
    ("node", "Node"),
    ("state", "State"),
    ("live", "Live"),
    ("free", "Free"),
    ("p99", "Step p99"),
    ("seen", "Seen"),
    ("version", "Version"),
    ("gpu", "GPU"),
)
STATE_COLOURS = {"ready": "call-live", "draining": "latency-warn", "down": "latency-bad"}


class NodesPanel(DataTable):
    """Every node of a ``FleetLink``; rows keyed by node name."""

    BINDINGS = [Binding("d", "drain", "Drain/resume", tooltip="Drain the selected node, or resume a drained one")]

    def __init__(self, link: Any, clock: Callable[[], float], *, read_only: bool = False, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self.link = link
        self.clock = clock
        self.read_only = read_only
        self._shown: dict[str, dict[str, Text]] = {}

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)
        self.border_title = "[u]N[/u]odes"
        self.refresh_nodes()
        self.set_interval(1.0, self.refresh_nodes)

    @property
    def selected_node(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
        except Exception:
            return None

    def refresh_nodes(self) -> None:
        colours = self.app.theme_variables
        now = self.clock()
        statuses = {s.name: s for s in self.link.nodes()}
        for name in [n for n in self._shown if n not in statuses]:
            self.remove_row(name)
            del self._shown[name]
        for name, status in statuses.items():
            seen = "—" if status.last_seen is None else f"{max(0.0, now - status.last_seen):.0f}s"
            cells = {
                "node": Text(name),
                "state": Text(status.state, style=colours.get(STATE_COLOURS.get(status.state, ""), "")),
                "live": Text(str(status.live) if status.state != "down" else "—"),
                "free": Text(str(status.free) if status.state != "down" else "—"),
                "p99": Text(f"{status.step_ms_p99:.1f} ms" if status.step_ms_p99 is not None else "—"),
                "seen": Text(seen),
                "version": Text(status.version or "—"),
                "gpu": Text(status.gpu or "—"),
            }
            old = self._shown.get(name)
            if old is None:
                self.add_row(*cells.values(), key=name)
            else:
                for column, value in cells.items():
                    if old[column] != value:
                        self.update_cell(name, column, value)
            self._shown[name] = cells
        down = sum(1 for s in statuses.values() if s.state == "down")
        self.border_title = f"[u]N[/u]odes {len(statuses)}" + (f" · {down} down" if down else "")

    def action_drain(self) -> None:
        name = self.selected_node
        if name is None or self.read_only:
            return
        draining = next((s.state == "draining" for s in self.link.nodes() if s.name == name), False)
        command: ev.Command = ev.ResumeNode() if draining else ev.DrainNode()
        verb = "resumed" if draining else "draining"
        try:
            future = self.link.node_command(name, command)
        except LinkError as exc:
            self.app.notify(str(exc), severity="error", markup=False)
            return

        def done(answer: Any) -> None:
            result = answer.result()
            if result.get("ok"):
                self.app.call_from_thread(self.app.notify, f"node {name} {verb}", timeout=3)
            else:
                message = str(result.get("error") or "refused")
                self.app.call_from_thread(self.app.notify, message, severity="error", markup=False)

        future.add_done_callback(done)
