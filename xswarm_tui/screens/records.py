"""History (ended calls), Inbox (voicemail, SMS, email) and Audit (supervisor actions): what
the node has stored, read from its database in a thread worker (the UI loop does no I/O).

The rows are the same records the ``xswarm calls|messages|audit`` commands print
(``xswarm_tui.records``), so the console and the command line never disagree. ``enter`` on a
History row opens the ended call's detail, with its recording playable (`p`) where this
machine has a sound device; on an Inbox or Audit row it shows the whole record.
"""

from __future__ import annotations

import io
import json
import wave
from typing import Any, ClassVar

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from xswarm_tui.link import Link
from xswarm_tui.records import (
    audit_record,
    call_details,
    call_record,
    clock_duration,
    describe_call,
    message_record,
    table_time,
)

LIMIT = 500
"""Newest records shown per screen; older ones are a `xswarm … list --limit` away."""
Row = tuple[str, tuple[str, ...], dict[str, Any]]
"""(row key, cells, the whole record for the detail view)."""


class RecordsScreen(Screen[None]):
    """A table of stored records; `f5` reloads, `enter` opens one."""

    NAME: ClassVar[str] = ""
    COLUMNS: ClassVar[tuple[tuple[str, str], ...]] = ()
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="records.back"),
        Binding("f5", "reload", "Reload", id="records.reload"),
        Binding("j", "cursor('down')", "Down", show=False, id="records.down"),
        Binding("k", "cursor('up')", "Up", show=False, id="records.up"),
    ]

    def __init__(self, link: Link, *, reveal: bool = False) -> None:
        super().__init__()
        self.link = link
        self.reveal = reveal
        """Full numbers and addresses, as the calls board's `r` chose."""
        self.records: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"loading {self.NAME.lower()}…", id="records-status", markup=False)
        yield DataTable(id="records-table", cursor_type="row")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.border_title = self.NAME
        for key, label in self.COLUMNS:
            table.add_column(label, key=key)
        table.focus()
        self.action_reload()

    def action_reload(self) -> None:
        self._load()

    def action_cursor(self, direction: str) -> None:
        table = self.query_one(DataTable)
        table.action_cursor_down() if direction == "down" else table.action_cursor_up()

    def fetch(self, db: Any) -> list[Row]:
        """The rows, newest first (runs on a worker thread)."""
        raise NotImplementedError

    @work(thread=True, exclusive=True, group="records", exit_on_error=False, description="Reading records")
    def _load(self) -> None:
        try:
            db = self.link.database()
            if db is None:
                self.app.call_from_thread(self._show, None, self.link.records_unavailable or "no database")
                return
            rows = self.fetch(db)
        except Exception as exc:  # the database may be remote and down: say so, keep the console
            self.app.call_from_thread(self._show, None, f"cannot read {self.NAME.lower()}: {exc}")
            return
        self.app.call_from_thread(self._show, rows, None)

    def _show(self, rows: list[Row] | None, why: str | None) -> None:
        status = self.query_one("#records-status", Static)
        table = self.query_one(DataTable)
        if rows is None:
            status.update(f"{self.NAME} not available: {why}")
            return
        status.update(f"{len(rows)} newest first" if rows else f"nothing yet: {self.empty_hint()}")
        table.clear()
        self.records = {}
        for key, cells, record in rows:
            table.add_row(*(Text(c) for c in cells), key=key)  # stored text is outside input: never markup
            self.records[key] = record
        table.border_title = f"{self.NAME} {len(rows)}"

    def empty_hint(self) -> str:
        return "records appear here as they are written"

    @on(DataTable.RowSelected)
    def _open(self, event: DataTable.RowSelected) -> None:
        record = self.records.get(str(event.row_key.value))
        if record is not None:
            self.open_record(str(event.row_key.value), record)

    def open_record(self, key: str, record: dict[str, Any]) -> None:
        self.app.push_screen(RecordScreen(self.NAME, json.dumps(record, indent=2, ensure_ascii=False)))


class HistoryScreen(RecordsScreen):
    NAME = "History"
    COLUMNS = (
        ("started", "Started (UTC)"),
        ("call", "Call"),
        ("caller", "Caller"),
        ("user", "User"),
        ("node", "Node"),
        ("duration", "Duration"),
        ("reason", "Ended because"),
    )

    def fetch(self, db: Any) -> list[Row]:
        from engine.store import calls

        rows: list[Row] = []
        for row in calls.recent(db, limit=LIMIT):
            if row["status"] != "ended":
                continue  # live calls are on the board
            r = call_record(row, self.reveal)
            cells = (
                table_time(r["started_at"]),
                r["call_sid"],
                r["caller"] or "—",
                r["user_id"] or "—",
                r["node_id"] or "—",
                clock_duration(r["duration_s"]),
                r["end_reason"] or "—",
            )
            rows.append((r["call_sid"], cells, r))
        return rows

    def empty_hint(self) -> str:
        return "ended calls are listed here (place a test call: xswarm call)"

    def open_record(self, key: str, record: dict[str, Any]) -> None:
        self.app.push_screen(EndedCallScreen(self.link, key, reveal=self.reveal))


class InboxScreen(RecordsScreen):
    NAME = "Inbox"
    COLUMNS = (
        ("at", "At (UTC)"),
        ("kind", "Kind"),
        ("dir", "Dir"),
        ("from", "From"),
        ("user", "User"),
        ("status", "Status"),
        ("text", "Text"),
    )

    def fetch(self, db: Any) -> list[Row]:
        from engine.store import messages

        rows: list[Row] = []
        for m in messages.recent(db, limit=LIMIT):
            r = message_record(m, self.reveal)
            text = r["subject"] or r["body"] or ""
            if r["kind"] == "voicemail":
                text = f"{float(r['meta'].get('duration_s') or 0):.0f} s of audio: xswarm messages audio {r['id']}"
            cells = (
                table_time(r["created_at"]),
                r["kind"],
                r["direction"],
                r["from"] or "—",
                r["user_id"] or "—",
                r["status"] or "—",
                text.replace("\n", " ")[:80],
            )
            rows.append((r["id"], cells, r))
        return rows

    def empty_hint(self) -> str:
        return "voicemail, SMS and email arrive through the webhooks (xswarm webhooks serve)"


class AuditScreen(RecordsScreen):
    NAME = "Audit"
    COLUMNS = (
        ("at", "At (UTC)"),
        ("actor", "Actor"),
        ("role", "Role"),
        ("action", "Action"),
        ("call", "Call"),
        ("result", "Result"),
    )

    def fetch(self, db: Any) -> list[Row]:
        from engine.store import audit

        rows: list[Row] = []
        for e in audit.recent(db, limit=LIMIT):
            record = audit_record(e)
            cells = (table_time(record["at"]), e.actor, e.role or "—", e.action, e.call_id or "—", e.result)
            rows.append((str(e.id), cells, record))
        return rows

    def empty_hint(self) -> str:
        return "every supervisor action (listen, take over, hang up, …) is recorded here"


class RecordScreen(Screen[None]):
    """One record in full, wrapped and scrollable."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="record.back")]

    def __init__(self, title: str, body: str) -> None:
        super().__init__()
        self.title_text = title
        self.body = body

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="record-body", classes="panel"):
            yield Static(self.body, id="record-text", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        body = self.query_one("#record-body", VerticalScroll)
        body.border_title = self.title_text
        body.focus()


class EndedCallScreen(RecordScreen):
    """An ended call as ``xswarm calls show`` prints it; `p` plays its recording here."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="ended.back"),
        Binding("p", "play", "Play recording", id="ended.play"),
        Binding("s", "stop", "Stop", id="ended.stop"),
    ]

    def __init__(self, link: Link, call_sid: str, *, reveal: bool) -> None:
        super().__init__(f"Call {call_sid}", "loading…")
        self.link = link
        self.call_sid = call_sid
        self.reveal = reveal
        self.details: dict[str, Any] | None = None

    def on_mount(self) -> None:
        super().on_mount()
        self._load()

    @work(thread=True, exclusive=True, group="records", exit_on_error=False, description="Reading the call")
    def _load(self) -> None:
        db = self.link.database()
        if db is None:
            self.app.call_from_thread(self._show, None, self.link.records_unavailable or "no database")
            return
        try:
            details = call_details(db, self.link.object_store, self.call_sid, self.reveal)
        except Exception as exc:  # a database that is down: say so rather than "loading…" forever
            self.app.call_from_thread(self._show, None, f"cannot read call {self.call_sid}: {exc}")
            return
        self.app.call_from_thread(self._show, details, None if details else f"no call {self.call_sid} in the database")

    def _show(self, details: dict[str, Any] | None, why: str | None) -> None:
        self.details = details
        text = "\n".join(describe_call(details)) if details is not None else str(why)
        self.query_one("#record-text", Static).update(text)

    def action_play(self) -> None:
        if self.details is None or not self.details.get("recording"):
            self.notify("this call has no recording", severity="warning", timeout=4)
            return
        self._play(self.details["recording"]["key"])

    @work(thread=True, group="playback-stop", exit_on_error=False, description="Stopping playback")
    def action_stop(self) -> None:
        audio = self.link.local_audio()  # opening the sound device may take a while: off the UI thread
        if not isinstance(audio, str):
            audio.stop_clip()

    @work(thread=True, exclusive=True, group="playback", exit_on_error=False, description="Playing the recording")
    def _play(self, key: str) -> None:
        audio = self.link.local_audio()  # opening the sound device may take a while: off the UI thread
        if isinstance(audio, str):
            self.app.call_from_thread(
                self.notify, audio, title="Cannot play", severity="warning", timeout=8, markup=False
            )
            return
        try:
            data = self.link.object_store().get_bytes(key)
            with wave.open(io.BytesIO(data)) as wav:
                rate, channels = wav.getframerate(), wav.getnchannels()
                pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        except Exception as exc:  # store down or a damaged file: tell the operator, who pressed a key
            self.app.call_from_thread(self.notify, f"cannot play: {exc}", severity="error", markup=False)
            return
        mono = pcm.reshape(-1, channels).mean(axis=1) if channels > 1 else pcm  # caller and AI together
        audio.play_clip(mono, rate)
        self.app.call_from_thread(self.notify, f"playing {len(mono) / rate:.0f} s (s stops)", timeout=4)
