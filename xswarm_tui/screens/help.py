"""Help (`?`/F1): the key table generated from the live bindings, then the shipped help.md.

One source of truth: a key added to ``BINDINGS`` appears here by itself, and keys hidden by
``--read-only`` are hidden here too. A full screen that scrolls (arrows, j/k, page keys,
home/end), so the whole guide is reachable at 80x24 as well as on a wall monitor.
"""

from __future__ import annotations

from importlib import resources

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Markdown


def keys_markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| Key | Action | What it does |", "|---|---|---|"]
    lines += [f"| `{key}` | {desc} | {tip} |" for key, desc, tip in rows]
    return "\n".join(lines)


def help_markdown(rows: list[tuple[str, str, str]]) -> str:
    guide = resources.files("xswarm_tui").joinpath("help.md").read_text(encoding="utf-8")
    return f"# Keys\n\n{keys_markdown(rows)}\n\n{guide}"


class HelpScreen(Screen[None]):
    BINDINGS = [
        Binding("escape,q,question_mark,f1", "close", "Close", id="help.close"),
        Binding("j", "scroll('down')", "Down", show=False, id="help.down"),
        Binding("k", "scroll('up')", "Up", show=False, id="help.up"),
        Binding("g", "scroll('home')", "Top", show=False, id="help.top"),
        Binding("G", "scroll('end')", "Bottom", show=False, id="help.bottom"),
    ]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(help_markdown(self.rows))
        yield Footer(compact=True)

    def on_mount(self) -> None:
        body = self.query_one("#help-body", VerticalScroll)
        body.border_title = "Help · ↑↓ PgUp PgDn scroll · escape closes"
        body.focus()

    def action_scroll(self, where: str) -> None:
        body = self.query_one("#help-body", VerticalScroll)
        {"down": body.scroll_down, "up": body.scroll_up, "home": body.scroll_home, "end": body.scroll_end}[where](
            animate=False
        )

    def action_close(self) -> None:
        self.dismiss(None)
