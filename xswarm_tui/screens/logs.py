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


class LogMirror:
    """Keeps the newest formatted records for the log screen and wakes the app.

    Fed by ``engine.logging_setup.add_mirror`` from whatever thread logged: it appends and
    notifies, never blocks and never touches a widget."""

    def __init__(self, notify: Callable[[], object], size: int = 2000) -> None:
        self.lines: deque[tuple[int, str]] = deque(maxlen=size)
        self._seq = 0
        self._lock = threading.Lock()
        self._notify = notify

    def __call__(self, record: logging.LogRecord, line: str) -> None:
        with self._lock:
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
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(RichLog).border_title = "Log (also in the log file)"
        self.refresh_logs()

    def refresh_logs(self) -> None:
        view = self.query_one(RichLog)
        for seq, line in list(self.mirror.lines):
            if seq > self._seen:
                view.write(line)
                self._seen = seq
