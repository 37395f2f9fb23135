"""The log view: a mirror of the records written to the log file (never to the terminal)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, RichLog

FORMAT = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")


class LogMirror(logging.Handler):
    """Keeps the newest records for the log screen and wakes the app (any thread, never blocks)."""

    def __init__(self, notify: Callable[[], None], size: int = 2000) -> None:
        super().__init__(level=logging.INFO)
        self.lines: deque[tuple[int, str]] = deque(maxlen=size)
        self._seq = 0
        self._lock_seq = threading.Lock()
        self._notify = notify

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = FORMAT.format(record)
        except Exception:  # a bad format argument in someone's log call must not break the app
            line = f"{record.name}: {record.msg!r}"
        with self._lock_seq:
            self._seq += 1
            self.lines.append((self._seq, line))
        self._notify()


class LogsScreen(Screen[None]):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="logs.back")]

    def __init__(self, mirror: LogMirror) -> None:
        super().__init__()
        self.mirror = mirror
        self._seen = 0

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="log-view", wrap=False, markup=False, max_lines=2000)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(RichLog).border_title = "Log (also in the log file)"
        self.refresh_logs()

    def refresh_logs(self) -> None:
        view = self.query_one(RichLog)
        for seq, line in list(self.mirror.lines):
            if seq > self._seen:
                view.write(line)
                self._seen = seq
