"""The runtime could not start (or the node refused us): what went wrong, how to fix it, and
Retry or Quit. Instead of an empty shell that says "Model starting…" forever."""

from __future__ import annotations

import re

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

_FIXES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"errno 98|address already in use", re.I),
        "A port this node needs is taken: another xswarm (or another program) is running. Stop it "
        "(`xswarm doctor` names the port), or choose free ports with XSWARM_SERVER__BRIDGE_PORT, "
        "XSWARM_SERVER__SUPERVISOR_PORT and XSWARM_SERVER__WEBHOOKS_PORT.",
    ),
    (
        re.compile(r"errno 13|permission denied", re.I),
        "Permission denied: ports below 1024 need root, and the data folder must be writable by you.",
    ),
    (
        re.compile(r"refused the token|401|4401", re.I),
        "The node refused this token. Use the operator or monitor token printed by "
        "`xswarm supervisor tokens` on the node (XSWARM_SUPERVISOR_TOKEN or --token).",
    ),
    (
        re.compile(r"token must be at least|16 characters", re.I),
        "Supervisor tokens need at least 16 characters; set a longer XSWARM_SUPERVISOR_TOKEN or "
        "unset it to have one generated.",
    ),
    (
        re.compile(r"cannot reach|no answer from|connection refused|errno 111", re.I),
        "Nothing answered at that address. Is `xswarm serve` running there, and does the URL name "
        "its supervisor port (default 9999)?",
    ),
)


def fix_for(error: str) -> str:
    """The operator's next step for a start or connection error, in one paragraph."""
    for pattern, fix in _FIXES:
        if pattern.search(error):
            return fix
    return "The log file has the details (`xswarm doctor` checks this machine)."


class RuntimeFailedScreen(ModalScreen[str]):
    """Dismisses with "retry" or "quit"."""

    BINDINGS = [
        Binding("r", "choose('retry')", "Retry", id="failed.retry"),
        Binding("q,escape", "choose('quit')", "Quit", id="failed.quit"),
    ]

    def __init__(self, title: str, error: str) -> None:
        super().__init__()
        self.title_text = title
        self.error = error

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="failed-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(self.error, id="failed-error", markup=False)
            yield Static(fix_for(self.error), id="failed-fix", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Retry (r)", id="retry", variant="primary")
                yield Button("Quit (q)", id="quit")

    def on_mount(self) -> None:
        self.query_one("#retry", Button).focus()

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(str(event.button.id))
