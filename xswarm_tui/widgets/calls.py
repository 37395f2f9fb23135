"""The calls board: one row per live call, keyed by call id and updated in place."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.text import Text
from textual.markup import escape
from textual.signal import Signal
from textual.widgets import DataTable

from xswarm_tui.state import CallView, ConsoleState, StateChanged, mask_caller
from xswarm_tui.widgets.format import bar, duration, level_fraction, ms

COLUMNS = (
    ("call", "Call"),
    ("caller", "Caller"),
    ("user", "User"),
    ("theme", "Theme"),
    ("duration", "Duration"),
    ("mode", "Mode"),
    ("bal", "BAL p50"),
    ("lag", "Playout lag"),
    ("late", "Late"),
    ("levels", "Caller │ AI"),
)
SORTS: dict[str, tuple[str, Callable[[CallView], object], bool]] = {
    "started": ("oldest first", lambda c: c.started_at, False),
    "bal": ("worst latency", lambda c: c.bal_p50 or 0.0, True),
    "late": ("most late frames", lambda c: c.late_frames, True),
    "mode": ("mode", lambda c: (c.mode, c.started_at), False),
    "user": ("user", lambda c: (c.user_id or "", c.started_at), False),
}
"""Sort orders `s` cycles through: name, key over a call, descending."""
LEVEL_WIDTH = 6


class CallBoard(DataTable):
    """Live calls. Rows are keyed by call id; a tick updates only the cells that changed."""

    def __init__(
        self,
        state: ConsoleState,
        clock: Callable[[], float],
        changes: Signal[StateChanged],
        *,
        node_of: Callable[[str], str | None] | None = None,
        **kwargs: object,
    ) -> None:
        """``node_of``: the node a call is on (a fleet console adds a Node column)."""
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)  # type: ignore[arg-type]
        self.state = state
        self.clock = clock
        self._changes = changes
        self._durations_at = 0.0
        self.node_of = node_of
        self.reveal = False
        """Show callers' full numbers (masked by default: the screen may be shared or recorded)."""
        self.filter_text = ""
        self.sort_name = "started"
        self._shown: dict[str, dict[str, object]] = {}
        """What each row currently displays, so unchanged cells are not redrawn."""

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)
            if key == "call" and self.node_of is not None:
                self.add_column("Node", key="node")
        self._title()
        self._changes.subscribe(self, self._state_changed, immediate=True)

    def _state_changed(self, change: StateChanged) -> None:
        if "calls" in change.parts:
            self.refresh_rows(set(change.calls))
        if time.monotonic() - self._durations_at >= 1.0:  # ride along: one table redraw, not two
            self.tick_durations()

    # ------------------------------------------------------------------------ queries
    @property
    def selected_call(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # cursor beyond the rows after a removal
            return None

    def matches(self, call: CallView) -> bool:
        if not self.filter_text:
            return True
        caller = call.caller if self.reveal else mask_caller(call.caller)
        node = self.node_of(call.call_id) if self.node_of is not None else None
        hay = " ".join(str(x) for x in (call.call_id, node, caller, call.user_id, call.theme, call.mode, call.source))
        return self.filter_text.lower() in hay.lower()

    # ------------------------------------------------------------------------ updates
    def refresh_rows(self, changed: set[str] | None = None) -> None:
        """Bring rows in line with the state; ``changed`` limits the work to those calls."""
        colours = self.app.theme_variables
        wanted = {cid for cid, call in self.state.calls.items() if self.matches(call)}
        for cid in [k for k in self._shown if k not in wanted]:
            self.remove_row(cid)
            del self._shown[cid]
        resort = False
        now = self.clock()
        for cid in wanted if changed is None else wanted & (changed | (wanted - set(self._shown))):
            cells = self._cells(self.state.calls[cid], now, colours)
            old = self._shown.get(cid)
            if old is None:
                self.add_row(*cells.values(), key=cid)
                resort = True
            else:
                for col, value in cells.items():
                    if old[col] != value:
                        self.update_cell(cid, col, value)
                        resort = resort or col in ("bal", "late", "mode", "user")
            self._shown[cid] = cells
        if resort:
            self._apply_sort()
        self._title()

    def tick_durations(self) -> None:
        """Once a second: only the duration column moves by itself."""
        self._durations_at = time.monotonic()
        now = self.clock()
        for cid, cells in self._shown.items():
            value = Text(duration(now - self.state.calls[cid].started_at))
            if cells["duration"] != value:
                cells["duration"] = value
                self.update_cell(cid, "duration", value)

    def cycle_sort(self) -> str:
        names = list(SORTS)
        self.sort_name = names[(names.index(self.sort_name) + 1) % len(names)]
        self._apply_sort()
        self._title()
        return SORTS[self.sort_name][0]

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        self.refresh_rows()

    def set_reveal(self, reveal: bool) -> None:
        self.reveal = reveal
        self.refresh_rows(set(self._shown))

    def _apply_sort(self) -> None:
        _, key, reverse = SORTS[self.sort_name]
        calls = self.state.calls
        self.sort("call", key=lambda cid: key(calls[cid.plain]), reverse=reverse)

    def _title(self) -> None:
        parts = [f"[u]C[/u]alls {len(self._shown)}"]
        if self.filter_text:
            parts.append(f"filter “{escape(self.filter_text)}”")  # typed text, never markup
        parts.append(f"sort: {SORTS[self.sort_name][0]}")
        if not self.reveal:
            parts.append("callers masked")
        self.border_title = " · ".join(parts)

    def _cells(self, call: CallView, now: float, colours: dict[str, str]) -> dict[str, object]:
        mode_colour = {"ai": "call-live", "operator": "call-operator", "muted": "call-muted"}[call.mode]
        mode = {"ai": "AI", "operator": f"OPERATOR {call.operator or ''}".strip(), "muted": "MUTED"}[call.mode]
        if call.listeners:
            mode += f" ◉{call.listeners}"
        caller = (
            "local mic" if call.source == "local" else (call.caller or "—") if self.reveal else mask_caller(call.caller)
        )
        levels = Text.assemble(
            (bar(level_fraction(call.in_level), LEVEL_WIDTH), colours.get("level-caller", "")),
            "│",
            (bar(level_fraction(call.out_level), LEVEL_WIDTH), colours.get("level-ai", "")),
        )
        # Every cell is a Text: plain strings would be parsed as markup on every redraw (slow),
        # and caller-supplied values (caller, user, theme come from the call) must never be markup.
        cells: dict[str, object] = {"call": Text(call.call_id)}
        if self.node_of is not None:
            cells["node"] = Text(self.node_of(call.call_id) or "—")
        return cells | {
            "caller": Text(caller),
            "user": Text(call.user_id or "—"),
            "theme": Text(call.theme or "—"),
            "duration": Text(duration(now - call.started_at)),
            "mode": Text(mode, style=colours.get(mode_colour, "")),
            "bal": Text(ms(call.bal_p50), style=_grade(call.bal_p50, 120, 250, colours)),
            "lag": Text(ms(call.lag), style=_grade(call.lag, 250, 500, colours)),
            "late": Text(str(call.late_frames), style=colours.get("latency-bad", "") if call.late_frames else ""),
            "levels": levels,
        }


def _grade(value: float | None, warn: float, bad: float, colours: dict[str, str]) -> str:
    if value is None:
        return ""
    key = "latency-good" if value < warn else "latency-warn" if value < bad else "latency-bad"
    return colours.get(key, "")
