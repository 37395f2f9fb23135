"""Help (`?`/F1): the key table generated from the live bindings, then the shipped help.md.

One source of truth: a key added to ``BINDINGS`` appears here by itself, and keys hidden by
``--read-only`` are hidden here too.
"""

from __future__ import annotations

from importlib import resources

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Markdown


def keys_markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| Key | Action | What it does |", "|---|---|---|"]
    lines += [f"| `{key}` | {desc} | {tip} |" for key, desc, tip in rows]
    return "\n".join(lines)


def help_markdown(rows: list[tuple[str, str, str]]) -> str:
    guide = resources.files("xswarm_tui").joinpath("help.md").read_text(encoding="utf-8")
    return f"# Keys\n\n{keys_markdown(rows)}\n\n{guide}"


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close", id="help.close")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        yield Markdown(help_markdown(self.rows), id="help-body")

    def on_mount(self) -> None:
        body = self.query_one("#help-body")
        body.border_title = "Help · escape closes"
        body.focus()

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
