"""The calls board: one row per live call, keyed by call id and updated in place.

Three things an operator relies on here:

* **The selection is a call, not a row number.** Sorting, filtering, new and ended calls
  reorder rows; the board remembers the selected call id and puts the cursor back on it, so
  the next key never acts on a different caller.
* **Columns shrink by priority.** On a narrow terminal (80x24) the board drops the least
  useful columns first and shortens the call id, so caller, mode and the latency figures
  stay on screen instead of scrolling off to the right.
* **Status is never colour alone.** Every graded figure carries a mark (``!`` warning,
  ``!!`` bad) so ``NO_COLOR`` and 16-colour terminals still show which call is in trouble.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.events import Resize
from textual.markup import escape
from textual.signal import Signal
from textual.widgets import DataTable

from xswarm_tui.state import CallView, ConsoleState, StateChanged, mask_caller
from xswarm_tui.widgets.format import bar, duration, level_fraction, ms


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int
    """Cells of content this column needs (the table adds 2 of padding)."""
    priority: int
    """Lower stays longer when the board is too narrow for every column."""


NODE = Column("node", "Node", 10, 2)
"""A fleet console's column (after the call id): which node carries the call."""
COLUMNS = (
    Column("call", "Call", 34, 0),
    Column("caller", "Caller", 12, 1),
    Column("user", "User", 10, 7),
    Column("theme", "Theme", 10, 9),
    Column("duration", "Duration", 8, 6),
    Column("mode", "Mode", 16, 2),
    Column("bal", "BAL p50", 9, 3),
    Column("lag", "Playout", 9, 4),
    Column("late", "Late", 7, 5),
    Column("levels", "Caller │ AI", 13, 8),
)
"""Display order; ``priority`` decides what goes first on a narrow screen."""
SHORT_ID = 10
"""Cells of a shortened call id: ``…`` and the id's tail (Twilio SIDs differ in their tail)."""
SORTS: dict[str, tuple[str, str, Callable[[CallView], object], bool]] = {
    "started": ("oldest first", "duration", lambda c: c.started_at, False),
    "bal": ("worst latency", "bal", lambda c: c.bal_p50 or 0.0, True),
    "late": ("most late frames", "late", lambda c: c.late_frames, True),
    "mode": ("mode", "mode", lambda c: (c.mode, c.started_at), False),
    "user": ("user", "user", lambda c: (c.user_id or "", c.started_at), False),
}
"""Sort orders `s` cycles through: name, column that shows the ▲/▼ mark, key over a call, descending."""
LEVEL_WIDTH = 6
GRADES = {"latency-good": "", "latency-warn": " !", "latency-bad": " !!"}
"""The mark beside a graded figure: readable without colour."""


class CallCell(Text):
    """The call-id cell, which carries the full id so sorting works on shortened labels."""

    call_id: str


def short_id(call_id: str, width: int = SHORT_ID) -> str:
    """``…`` and the id's last ``width - 1`` characters: the tail tells Twilio SIDs apart."""
    return call_id if len(call_id) <= width else "…" + call_id[-(width - 1) :]


def fit_columns(available: int, *, fleet: bool = False) -> tuple[tuple[Column, ...], bool]:
    """Which columns fit in ``available`` cells (in display order), and whether ids are short.

    The call id is shortened before any column is dropped; then columns go by priority. A
    fleet console has the Node column too."""
    every = (COLUMNS[0], NODE, *COLUMNS[1:]) if fleet else COLUMNS
    chosen: list[Column] = []
    short = sum(c.width + 2 for c in every) > available
    used = 0
    for column in sorted(every, key=lambda c: c.priority):
        width = (SHORT_ID if short and column.key == "call" else column.width) + 2
        if chosen and used + width > available:
            continue
        chosen.append(column)
        used += width
    return tuple(c for c in every if c in chosen), short


class CallBoard(DataTable):
    """Live calls. Rows are keyed by call id; a tick updates only the cells that changed."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False, id="board.down"),
        Binding("k", "cursor_up", "Up", show=False, id="board.up"),
        Binding("g,home", "scroll_top", "Top", show=False, id="board.top"),
        Binding("G,end", "scroll_bottom", "Bottom", show=False, id="board.bottom"),
    ]

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
        self.sort_reverse = False
        """True after `S`: the current sort order, upside down."""
        self.listening: set[str] = set()
        """Calls this console listens to (marked ♪ in the Mode column)."""
        self.me: str | None = None
        """This console's operator name: a call it holds says "you"."""
        self._shown: dict[str, dict[str, object]] = {}
        """What each row currently displays, so unchanged cells are not redrawn."""
        self._selected: str | None = None
        """The call the cursor is on; kept through sorts, filters, new and ended calls."""
        self._columns: tuple[Column, ...] = ()
        self._short = False

    def on_mount(self) -> None:
        self._layout(self.size.width or 120)
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
        if self._selected in self._shown:
            return self._selected
        if not self.row_count:
            return None
        try:
            return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
        except Exception:  # cursor beyond the rows after a removal
            return None

    def matches(self, call: CallView) -> bool:
        if not self.filter_text:
            return True
        caller = call.caller if self.reveal else mask_caller(call.caller)
        node = self.node_of(call.call_id) if self.node_of is not None else None
        fields = (call.call_id, node, caller, call.user_id, call.theme, call.mode, call.source, call.operator)
        hay = " ".join(str(x) for x in fields)
        return self.filter_text.lower() in hay.lower()

    # ---------------------------------------------------------------------- selection
    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self._selected = str(event.row_key.value)

    def select_call(self, call_id: str) -> None:
        """Put the cursor on ``call_id`` (if it is shown)."""
        self._selected = call_id
        self._restore_cursor()

    def _restore_cursor(self) -> None:
        if self._selected in self._shown and self.row_count:
            index = self.get_row_index(self._selected)
            if index != self.cursor_row:
                self.move_cursor(row=index, animate=False, scroll=True)

    def action_scroll_top(self) -> None:
        if self.row_count:
            self.move_cursor(row=0)

    def action_scroll_bottom(self) -> None:
        if self.row_count:
            self.move_cursor(row=self.row_count - 1)

    # ------------------------------------------------------------------------ updates
    def refresh_rows(self, changed: set[str] | None = None) -> None:
        """Bring rows in line with the state; ``changed`` limits the work to those calls."""
        colours = self.app.theme_variables
        wanted = {cid for cid, call in self.state.calls.items() if self.matches(call)}
        removed = [k for k in self._shown if k not in wanted]
        if self._selected in removed and self.row_count > 1:
            # The selected call is going: the cursor moves to its neighbour, not to whatever row
            # happens to slide under it later.
            index = self.get_row_index(self._selected)
            rows = [str(r.key.value) for r in self.ordered_rows]
            survivors = [r for r in rows[index + 1 :] + rows[:index][::-1] if r not in removed]
            self._selected = survivors[0] if survivors else None
        for cid in removed:
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
        if self._selected not in self._shown and self.row_count:
            self._selected = str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
        self._restore_cursor()
        self._title()

    def tick_durations(self) -> None:
        """Once a second: only the duration column moves by itself."""
        self._durations_at = time.monotonic()
        if not any(c.key == "duration" for c in self._columns):
            return
        now = self.clock()
        for cid, cells in self._shown.items():
            value = Text(duration(now - self.state.calls[cid].started_at))
            if cells["duration"] != value:
                cells["duration"] = value
                self.update_cell(cid, "duration", value)

    def cycle_sort(self) -> str:
        names = list(SORTS)
        self.sort_name = names[(names.index(self.sort_name) + 1) % len(names)]
        self.sort_reverse = False
        self._resorted()
        return self.sort_label()

    def reverse_sort(self) -> str:
        self.sort_reverse = not self.sort_reverse
        self._resorted()
        return self.sort_label()

    def sort_label(self) -> str:
        return SORTS[self.sort_name][0] + (", reversed" if self.sort_reverse else "")

    def _resorted(self) -> None:
        self._label_columns()
        self._apply_sort()  # after the labels: sorting is what makes the table draw its header anew
        self._restore_cursor()
        self._title()

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        self.refresh_rows()

    def set_reveal(self, reveal: bool) -> None:
        self.reveal = reveal
        self.refresh_rows(set(self._shown))

    def mark_listening(self, listening: set[str]) -> None:
        """This console started or stopped listening to a call: redraw those Mode cells."""
        changed = listening ^ self.listening
        self.listening = set(listening)
        self.refresh_rows(changed & set(self._shown))

    # ------------------------------------------------------------------------- layout
    @on(Resize)
    def _resized(self, event: Resize) -> None:
        self._layout(event.size.width)

    def _layout(self, width: int) -> None:
        """Choose the columns that fit; rebuild the (few) rows only when that choice changes."""
        columns, short = fit_columns(max(20, width - 2), fleet=self.node_of is not None)  # minus the scrollbar
        if (columns, short) == (self._columns, self._short):
            return
        self._columns, self._short = columns, short
        self.clear(columns=True)
        self._shown.clear()
        for column in columns:
            self.add_column(self._label(column), key=column.key)
        self.refresh_rows()

    def _label(self, column: Column) -> Text:
        """The header: ▲/▼ on the sort column; every label keeps room for the mark, so moving
        it never changes a column's width."""
        if column.key != SORTS[self.sort_name][1]:
            return Text(f"{column.label}  ")
        descending = SORTS[self.sort_name][3] != self.sort_reverse
        return Text(f"{column.label} {'▼' if descending else '▲'}")

    def _label_columns(self) -> None:
        for column in self._columns:
            self.columns[column.key].label = self._label(column)  # type: ignore[index]

    def _apply_sort(self) -> None:
        _, _, key, reverse = SORTS[self.sort_name]
        calls = self.state.calls

        def by_call(cell: object) -> object:
            return key(calls[cell.call_id]) if isinstance(cell, CallCell) and cell.call_id in calls else 0

        self.sort("call", key=by_call, reverse=reverse != self.sort_reverse)

    def _title(self) -> None:
        parts = [f"[u]C[/u]alls {len(self._shown)}"]
        if self.filter_text:
            parts.append(f"filter “{escape(self.filter_text)}” (esc clears)")  # typed text, never markup
        parts.append(f"sort: {self.sort_label()}")
        if not self.reveal:
            parts.append("callers masked")
        self.border_title = " · ".join(parts)

    def _cells(self, call: CallView, now: float, colours: dict[str, str]) -> dict[str, object]:
        mode_colour = {"ai": "call-live", "operator": "call-operator", "muted": "call-muted"}[call.mode]
        holder = "you" if call.operator is not None and call.operator == self.me else call.operator
        mode = {"ai": "AI", "operator": f"OPER {holder or '?'}", "muted": "MUTED"}[call.mode]
        if call.listeners:
            mode += f" ◉{call.listeners}"
        if call.call_id in self.listening:
            mode += " ♪"
        caller = (
            "local mic" if call.source == "local" else (call.caller or "—") if self.reveal else mask_caller(call.caller)
        )
        levels = Text.assemble(
            (bar(level_fraction(call.in_level), LEVEL_WIDTH), colours.get("level-caller", "")),
            "│",
            (bar(level_fraction(call.out_level), LEVEL_WIDTH), colours.get("level-ai", "")),
        )
        label = CallCell(short_id(call.call_id) if self._short else call.call_id)
        label.call_id = call.call_id
        # Every cell is a Text: plain strings would be parsed as markup on every redraw (slow),
        # and caller-supplied values (caller, user, theme come from the call) must never be markup.
        cells: dict[str, object] = {
            "call": label,
            "node": Text((self.node_of(call.call_id) if self.node_of is not None else None) or "—"),
            "caller": Text(caller),
            "user": Text(call.user_id or "—"),
            "theme": Text(call.theme or "—"),
            "duration": Text(duration(now - call.started_at)),
            "mode": Text(mode, style=colours.get(mode_colour, "")),
            "bal": _graded(ms(call.bal_p50), call.bal_p50, 120, 250, colours),
            "lag": _graded(ms(call.lag), call.lag, 250, 500, colours),
            "late": Text(f"{call.late_frames} LATE", style=colours.get("latency-bad", ""))
            if call.late_frames
            else Text("0"),
            "levels": levels,
        }
        return {c.key: cells[c.key] for c in self._columns}


def grade(value: float | None, warn: float, bad: float) -> str:
    """The theme variable for a figure: ``latency-good``, ``-warn`` or ``-bad`` ('' when unknown)."""
    if value is None:
        return ""
    return "latency-good" if value < warn else "latency-warn" if value < bad else "latency-bad"


def _graded(text: str, value: float | None, warn: float, bad: float, colours: dict[str, str]) -> Text:
    key = grade(value, warn, bad)
    return Text(text + GRADES.get(key, ""), style=colours.get(key, ""))
