"""Users with tier and this month's usage, read through the link in a thread worker."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from xswarm_tui.link import Link


class UsersScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="users.back"),
        Binding("f5", "reload", "Reload", id="users.reload"),
    ]

    def __init__(self, link: Link | None) -> None:
        super().__init__()
        self.link = link

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading users…", id="users-status")
        yield DataTable(id="users-table", cursor_type="row")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.border_title = "Users (this month)"
        for key, label in (
            ("id", "User"),
            ("name", "Name"),
            ("tier", "Tier"),
            ("phone", "Phone"),
            ("voice", "Voice min"),
            ("sms", "SMS"),
            ("email", "Email"),
        ):
            table.add_column(label, key=key)
        self.action_reload()

    def action_reload(self) -> None:
        self._load_users()

    @work(thread=True, exclusive=True, group="users", exit_on_error=False, description="Reading users")
    def _load_users(self) -> None:
        if self.link is None:
            self.app.call_from_thread(self._show, None, "the runtime is still starting")
            return
        try:
            rows = self.link.users()
        except Exception as exc:  # the database may be remote and down: say so, keep the console
            self.app.call_from_thread(self._show, None, f"cannot read users: {exc}")
            return
        self.app.call_from_thread(self._show, rows, self.link.users_unavailable)

    def _show(self, rows: list | None, why: str | None) -> None:
        status = self.query_one("#users-status", Static)
        table = self.query_one(DataTable)
        if rows is None:
            status.update(f"Users are not available: {why}")
            return
        status.update(f"{len(rows)} users")
        table.clear()
        for r in rows:
            cells = (r.user_id, r.name, r.tier, r.phone or "—", f"{r.voice_minutes:.1f}", r.sms, r.email)
            table.add_row(*(Text(str(c)) for c in cells), key=r.user_id)  # names are data, not markup
