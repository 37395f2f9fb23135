"""The events feed: SMS, email, payments, users, webhook failures, calls, errors; filterable.

Each row is one line; when it is cut off, the cursor (shown while the feed has focus) and
``enter`` open the whole event, wrapped."""

from __future__ import annotations

import time

from rich.text import Text
from textual.binding import Binding
from textual.markup import escape
from textual.signal import Signal
from textual.widgets import DataTable

from xswarm_tui.state import FEED_SIZE, ConsoleState, FeedItem, StateChanged

CATEGORY_COLOURS = {
    "payment": "event-money",
    "sms": "event-message",
    "email": "event-message",
    "user": "event-money",
    "error": "event-error",
    "webhook": "event-message",
    "call": "call-live",
    "supervisor": "call-operator",
    "model": "gpu",
}


class EventsFeed(DataTable):
    """Newest at the bottom; rows keyed by sequence number so new ones append, old ones drop."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False, id="events.down"),
        Binding("k", "cursor_up", "Up", show=False, id="events.up"),
        Binding("g,home", "scroll_top", "Top", show=False, id="events.top"),
        Binding("G,end", "scroll_bottom", "Bottom", show=False, id="events.bottom"),
    ]

    def __init__(self, state: ConsoleState, changes: Signal[StateChanged], **kwargs: object) -> None:
        super().__init__(cursor_type="row", show_cursor=False, **kwargs)  # type: ignore[arg-type]
        self.state = state
        self.filter_text = ""
        self._shown: list[int] = []
        self._last_seq = 0
        self._changes = changes
        self._items: dict[str, FeedItem] = {}
        """Shown rows by key, for the detail view."""

    def on_focus(self) -> None:
        self.show_cursor = True  # a cursor only while the operator reads here

    def on_blur(self) -> None:
        self.show_cursor = False

    def item(self, key: str) -> FeedItem | None:
        """The event behind a row (its whole text)."""
        return self._items.get(key)

    def action_scroll_top(self) -> None:
        if self.row_count:
            self.move_cursor(row=0)

    def action_scroll_bottom(self) -> None:
        if self.row_count:
            self.move_cursor(row=self.row_count - 1)

    def on_mount(self) -> None:
        self.add_column("Time", key="at", width=8)
        self.add_column("Kind", key="kind", width=10)
        self.add_column("Event", key="text", width=self._text_width())
        self._title()
        self.refresh_feed()  # events folded before this widget was mounted
        self._changes.subscribe(self, self._state_changed, immediate=True)

    def _state_changed(self, change: StateChanged) -> None:
        if "feed" in change.parts:
            self.refresh_feed()

    def on_resize(self) -> None:
        column = self.columns.get("text")  # type: ignore[call-overload]
        if column is not None:  # a resize can come before on_mount added the columns
            column.width = self._text_width()
            self.refresh()

    def _text_width(self) -> int:
        """The Event column takes the rest of the panel. A fixed width, not measured from the
        rows: a long event would widen the table past the panel, and the measurement happens
        only when the table next goes idle (so a quiet feed could keep a stale, narrow one)."""
        return max(10, self.size.width - (8 + 10) - 3 * 2 - 2)  # two fixed columns, padding, scrollbar

    def matches(self, item: FeedItem) -> bool:
        f = self.filter_text.lower()
        return not f or f in item.category or f in item.text.lower()

    def refresh_feed(self) -> None:
        """Append what is new since the last call; drop rows beyond the feed size."""
        if not self.columns:
            return  # not mounted yet: on_mount adds the columns, then every item so far
        colours = self.app.theme_variables
        at_end = self.scroll_y >= self.max_scroll_y
        for item in self.state.feed:
            if item.seq <= self._last_seq:
                continue
            self._last_seq = item.seq
            if self.matches(item):
                self._add(item, colours)
        while len(self._shown) > FEED_SIZE:
            key = str(self._shown.pop(0))
            self.remove_row(key)
            self._items.pop(key, None)
        if at_end:  # follow the tail unless the operator scrolled up to read
            # After the refresh: only then does the table know its new height, so the tail is
            # followed from the very first batch of rows (not from the second, or never).
            self.call_after_refresh(self.scroll_end, animate=False)
        self._title()

    def set_filter(self, text: str) -> None:
        """A new filter is rare and deliberate: rebuilding the rows is fine here."""
        self.filter_text = text.strip()
        self.clear()
        self._shown.clear()
        self._items.clear()
        self._last_seq = 0
        self.refresh_feed()

    def _add(self, item: FeedItem, colours: dict[str, str]) -> None:
        style = colours.get(CATEGORY_COLOURS.get(item.category, ""), "")
        # Text, not str: event text carries outside input (SMS summaries, names) that must not be markup.
        self.add_row(
            Text(time.strftime("%H:%M:%S", time.localtime(item.at))),
            Text(item.category, style=style),
            Text(item.text),
            key=str(item.seq),
        )
        self._shown.append(item.seq)
        self._items[str(item.seq)] = item

    def _title(self) -> None:
        title = f"[u]E[/u]vents {len(self._shown)}"
        if self.filter_text:
            title += f" · filter “{escape(self.filter_text)}”"  # typed text, never markup
        self.border_title = title
