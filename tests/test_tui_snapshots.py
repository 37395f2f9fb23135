"""Snapshots of the main screens at 120×40 (one at 256 colours), from a fixed replay of events.

Deterministic by construction: a fixed clock, fixed event times, UTC, no live CPU figures,
no cursor blink, no animation. Update with `pytest tests/test_tui_snapshots.py --snapshot-update`
after a deliberate change, and look at the SVGs before committing them.
"""

from __future__ import annotations

import re
import time
from functools import partial
from typing import Any

import pytest
from textual.widgets import DataTable
from tui_support import FIXED_NOW, ReplayLink, busy_night

from xswarm_tui.app import XswarmApp

SIZE = (120, 40)


@pytest.fixture(autouse=True)
def _utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


def _app(theme: str = "xswarm", read_only: bool = False) -> XswarmApp:
    return XswarmApp(ReplayLink(list(busy_night(3))), theme=theme, read_only=read_only, clock=lambda: FIXED_NOW)


async def _settle(pilot: Any, calls: int = 3) -> None:
    app = pilot.app
    while not app.link_open or len(app.board.rows) < calls or app.state.dirty:  # the footer waits for the link
        await pilot.pause(0.05)
    await _steady(pilot)


async def _steady(pilot: Any) -> None:
    """Wait until two screenshots 0.2 s apart agree. Why: on a loaded machine Textual may still
    be laying out (or drawing a table whose columns just grew) when the data has settled; the
    snapshot must show the settled screen, not how far the redraw had got."""
    previous = None
    for _ in range(50):
        for table in pilot.app.screen_stack[0].query(DataTable):
            table.check_idle()  # a table measures its new rows' columns when it next goes idle
        shot = re.sub(r"terminal-\d+", "terminal", pilot.app.export_screenshot())
        if shot == previous:
            return
        previous = shot
        await pilot.pause(0.2)
    raise AssertionError("the screen never settled")


def test_dashboard(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_settle)


def test_dashboard_read_only_hal(snap_compare: Any) -> None:
    assert snap_compare(_app("hal-9000", read_only=True), terminal_size=SIZE, run_before=_settle)


def test_call_detail(snap_compare: Any) -> None:
    async def open_detail(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("down", "enter")
        await _steady(pilot)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=open_detail)


def test_help(snap_compare: Any) -> None:
    async def open_help(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("question_mark")
        await _steady(pilot)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=open_help)


def test_dashboard_at_256_colours(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTUAL_COLOR_SYSTEM", "256")
    assert snap_compare(_app("kitt"), terminal_size=SIZE, run_before=_settle)


# -------------------------------------------------------------- issue 14: small and colourless
SMALL = (80, 24)


def test_dashboard_80x24(snap_compare: Any) -> None:
    """Short call ids, columns dropped by priority, help and quit first in the footer."""
    assert snap_compare(_app(), terminal_size=SMALL, run_before=_settle)


def test_dashboard_no_color(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """NO_COLOR: the marks (!, !!, LATE) and the mode words carry the status."""
    monkeypatch.setenv("NO_COLOR", "1")
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_settle)


def test_help_80x24(snap_compare: Any) -> None:
    async def open_help(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("question_mark")
        await _steady(pilot)

    assert snap_compare(_app(), terminal_size=SMALL, run_before=open_help)


def test_quit_asks_with_live_calls(snap_compare: Any) -> None:
    async def press_quit(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("q")
        await _steady(pilot)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=press_quit)


def test_empty_board_guide(snap_compare: Any) -> None:
    node = {"id": "node-a", "bridge_port": 9998, "supervisor_port": 9999, "webhooks_port": 8787}
    app = XswarmApp(ReplayLink(list(busy_night(0)), snapshot={"node": node}), clock=lambda: FIXED_NOW)

    assert snap_compare(app, terminal_size=SIZE, run_before=partial(_settle, calls=0))
