"""The console to the standard of k9s and htop: one Pilot test per item an operator tripped on.

Replayed events (``ReplayLink``) where the screen's logic is the point; a real echo runtime
with a call placed through the real bridge where the call itself must be seen to survive or
end. Numbers in the test names are the items of the issue.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from tui_support import (
    FIXED_NOW,
    RecordingAudio,
    ReplayLink,
    busy_night,
    cell,
    start_call,
    telephony_env,
    toasts,
    until,
)

from engine import events as ev
from engine.config import load_settings
from engine.runtime import Runtime
from themes import list_themes
from xswarm_tui.app import XswarmApp
from xswarm_tui.link import EmbeddedLink
from xswarm_tui.preferences import choose_theme, remember_theme, remembered_theme
from xswarm_tui.screens.dialogs import ConfirmScreen, TransferScreen
from xswarm_tui.screens.failed import RuntimeFailedScreen
from xswarm_tui.screens.records import AuditScreen, EndedCallScreen, HistoryScreen, InboxScreen, RecordScreen
from xswarm_tui.state import ConsoleState
from xswarm_tui.widgets.calls import fit_columns, short_id
from xswarm_tui.widgets.empty import EmptyBoard

CA1, CA2, CA3 = "CA01f3e9", "CA02f3e9", "CA03f3e9"


def _app(calls: int = 3, **kw: Any) -> tuple[XswarmApp, ReplayLink]:
    snapshot = kw.pop("snapshot", None)
    link = ReplayLink(list(busy_night(calls)), read_only=kw.pop("link_read_only", False), snapshot=snapshot)
    return XswarmApp(link, clock=lambda: FIXED_NOW, **kw), link


async def _ready(pilot: Any, calls: int = 3) -> None:
    app = pilot.app
    await until(pilot, lambda: app.link_open and len(app.board.rows) == calls and not app.state.dirty)


def _footer(app: XswarmApp) -> set[str]:
    return {b.binding.action for b in app.screen.active_bindings.values() if b.enabled and b.binding.show}


# ------------------------------------------------------------------------------------ 1. quit
async def test_1_quit_with_live_calls_asks_naming_them_and_no_keeps_every_call(echo_runtime: Runtime) -> None:
    runtime = echo_runtime
    link = EmbeddedLink(lambda: runtime, audio=lambda: "no audio")
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: runtime.model is not None and app.link_open)
        first = start_call(runtime, "CA" + "1" * 32)
        second = start_call(runtime, "CA" + "2" * 32)
        await until(pilot, lambda: len(app.board.rows) == 2)
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "2 live calls will be ended" in app.screen.question
        await pilot.press("q")  # a second q is not an answer
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen) and len(app.screen_stack) == 2
        await pilot.press("n")
        await pilot.pause(0.3)
        assert app.is_running and not first.ended and not second.ended and runtime.calls.used == 2
        await pilot.press("q", "y")
        await pilot.pause(0.3)
        assert not app.is_running
    link.close()


async def test_1_quit_without_calls_does_not_ask() -> None:
    app, _ = _app(0)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.link_open)
        await pilot.press("q")
        await pilot.pause(0.2)
        assert not app.is_running


# ------------------------------------------------------------------------------- 2. selection
async def test_2_the_selection_stays_on_the_call_through_sorts_filters_new_and_ended_calls() -> None:
    app, link = _app(3)
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot)
        board = app.board
        assert [str(r.key.value) for r in board.ordered_rows] == [CA3, CA2, CA1]  # oldest first
        await pilot.press("j", "j")
        assert board.selected_call == CA1 and board.cursor_row == 2
        await pilot.press("s")  # worst latency first: CA3, CA2, CA1
        await pilot.pause(0.1)
        assert board.selected_call == CA1 and board.get_row_index(CA1) == board.cursor_row
        await pilot.press("S")  # reversed: CA1 has the best latency, now first
        await pilot.pause(0.1)
        assert board.get_row_index(CA1) == 0 and board.cursor_row == 0 and board.selected_call == CA1
        app._queue(ev.CallStarted("CA00new", 4, "twilio", "+15550100999", at=FIXED_NOW))  # a new call arrives
        await until(pilot, lambda: "CA00new" in board.rows)
        assert board.selected_call == CA1 and board.get_row_index(CA1) == board.cursor_row
        app._queue(ev.CallEnded(CA3, "caller hung up", 60.0, at=FIXED_NOW))
        await until(pilot, lambda: CA3 not in board.rows)
        assert board.selected_call == CA1 and board.get_row_index(CA1) == board.cursor_row
        await pilot.press("t")  # the key acts on the call the operator chose, not on a row number
        await until(pilot, lambda: bool(link.sent))
        assert link.sent == [ev.TakeOver(CA1)]
        app._queue(ev.CallEnded(CA1, "caller hung up", 60.0, at=FIXED_NOW))  # the selected call ends
        await until(pilot, lambda: CA1 not in board.rows)
        assert board.selected_call in board.rows and board.get_row_index(board.selected_call) == board.cursor_row


async def test_2_sort_marks_its_column_and_g_G_jump() -> None:
    app, _ = _app(3)
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot)
        board = app.board
        assert str(board.columns["duration"].label).endswith("▲")  # type: ignore[index]
        await pilot.press("s")
        assert str(board.columns["bal"].label) == "BAL p50 ▼" and str(board.columns["duration"].label) == "Duration  "  # type: ignore[index]
        await pilot.press("S")
        assert str(board.columns["bal"].label) == "BAL p50 ▲"  # type: ignore[index]
        assert "reversed" in str(board.border_title)
        await pilot.press("G")
        assert board.cursor_row == 2
        await pilot.press("g")
        assert board.cursor_row == 0


# ----------------------------------------------------------------------------- 3. (test_tui)
# The dead node and the retry are in test_tui.py::test_a_dead_node_says_disconnected_at_once_and_is_retried.


# ------------------------------------------------------------------------------------ 4. help
@pytest.mark.parametrize("read_only", [False, True])
async def test_4_help_fits_80x24_and_scrolls_to_the_end(read_only: bool) -> None:
    app, _ = _app(2, read_only=read_only)
    async with app.run_test(size=(80, 24)) as pilot:
        await _ready(pilot, 2)
        await pilot.press("question_mark")
        await pilot.pause(0.3)
        body = app.screen.query_one("#help-body")
        assert body.region.right <= 80 and body.region.bottom <= 24
        assert body.max_scroll_y > 0
        await pilot.press("G")
        await pilot.pause(0.2)
        assert body.scroll_y == body.max_scroll_y  # the guide's end (colours) is reachable
        await pilot.press("g", "pagedown")
        await pilot.pause(0.2)
        assert body.scroll_y > 0
        await pilot.press("escape")
        assert app.screen is app.screen_stack[0]


# ---------------------------------------------------------------------------------- 5. filter
async def test_5_the_filter_never_steals_keys_and_escape_clears_it() -> None:
    app, link = _app(3)
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot)
        await pilot.press("L", "slash")  # `/` on the Logs screen must not open the dashboard's filter
        await pilot.pause(0.1)
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert app.focused is app.board and not app.query_one("#calls-filter").has_class("shown")
        await pilot.press("t")  # a key, not a letter typed into a hidden box
        await until(pilot, lambda: bool(link.sent))
        assert isinstance(link.sent[0], ev.TakeOver)
        await pilot.press("slash", *"CA02", "enter")  # applied; focus back on the board
        await until(pilot, lambda: len(app.board.rows) == 1)
        assert app.focused is app.board
        await pilot.press("escape")  # escape on the board clears the applied filter
        await until(pilot, lambda: len(app.board.rows) == 3)
        assert app.board.filter_text == "" and not app.query_one("#calls-filter").has_class("shown")


# ----------------------------------------------------------------------------- 6. empty state
async def test_6_an_empty_board_says_how_to_place_a_test_call_on_this_nodes_ports() -> None:
    node = {"id": "n1", "bridge_port": 9998, "supervisor_port": 9999, "webhooks_port": 8787}
    app, link = _app(0, snapshot={"node": node})
    fallback = "no CUDA GPU and MLX is unavailable: using the echo model instead of moshi (set model.name to choose)"
    link.events.append(ev.ModelStatusChanged(model="echo", state="fallback", detail=fallback, at=FIXED_NOW))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.link_open)
        await pilot.pause(0.3)
        guide = app.query_one(EmptyBoard)
        text = str(guide.render())
        assert guide.display and guide.region.height > 5
        assert "xswarm call --bridge ws://127.0.0.1:9998/twilio" in text
        assert "xswarm call --webhooks http://127.0.0.1:8787" in text
        assert "bridge :9998 · supervisor :9999 · webhooks :8787" in text
        assert f"Model: echo fallback: {fallback}" in text  # the whole reason, not a cut-off feed line
        app._queue(ev.CallStarted("CA9", 0, "twilio", "+15550100123", at=FIXED_NOW))
        await until(pilot, lambda: "CA9" in app.board.rows)
        await pilot.pause(0.1)
        assert not guide.display  # the board takes the room back


# ---------------------------------------------------------------------------- 7. failed start
async def test_7_a_busy_port_says_what_to_do_offers_no_call_keys_and_retry_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    telephony_env(monkeypatch)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    link = EmbeddedLink(
        lambda: Runtime(load_settings(), model_spec="echo", bridge_port=port, supervisor_port=0, webhooks_port=0),
        audio=lambda: "no audio",
    )
    app = XswarmApp(link)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, RuntimeFailedScreen), timeout=15)
            text = " ".join(str(w.render()) for w in app.screen.query("Static"))
            assert "port this node needs is taken" in text and "XSWARM_SERVER__BRIDGE_PORT" in text
            assert "Errno 98" in text or "in use" in text
            assert not app._allowed("take_over", app.screen_stack[0])
            assert not app._allowed("hang_up", app.screen_stack[0])
            assert "not running" in app.sub_title
            blocker.close()  # the operator freed the port
            await pilot.press("r")
            await until(pilot, lambda: app.link_open, timeout=20)
            assert app._allowed("take_over", app.screen_stack[0]) and "live" in app.sub_title
    finally:
        blocker.close()
        link.close()


# ----------------------------------------------------------------------------------- 8. 80x24
def test_8_columns_shrink_by_priority() -> None:
    wide, short = fit_columns(200)
    assert not short and len(wide) == 10
    narrow, short = fit_columns(78)
    keys = [c.key for c in narrow]
    assert short and {"call", "caller", "mode", "bal", "lag", "late"} <= set(keys)
    assert "theme" not in keys and "levels" not in keys
    assert short_id("CA" + "0" * 24 + "89abcdef") == "…089abcdef" and short_id("local-1") == "local-1"


async def test_8_at_80x24_the_figures_stay_on_screen_and_help_and_quit_in_the_footer() -> None:
    app, _ = _app(3)
    async with app.run_test(size=(80, 24)) as pilot:
        await _ready(pilot)
        board = app.board
        assert {"call", "caller", "mode", "bal", "lag", "late"} <= set(board.columns)  # type: ignore[arg-type]
        assert board.virtual_size.width <= board.size.width  # nothing scrolled off to the right
        footer = app.screen.query_one("Footer")

        def visible() -> set[str]:  # footer keys drawn inside the 80 columns
            keys = footer.query("FooterKey")
            return {getattr(k, "action", "") for k in keys if k.region.width > 0 and k.region.right <= 80}

        await until(pilot, lambda: {"help", "quit"} <= visible())


# ------------------------------------------------------------------------------ 9. not colour
async def test_9_graded_figures_carry_a_mark_not_only_a_colour() -> None:
    app, _ = _app(3)
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot)
        assert cell(app, CA1, "bal") == "98 ms"  # p50 98.5 ms: fine, no mark
        assert cell(app, CA2, "bal") == "138 ms !"  # warning
        assert cell(app, CA3, "lag") == "360 ms !"
        assert cell(app, CA2, "late") == "2 LATE" and cell(app, CA1, "late") == "0"
        for _ in range(10):  # a bad stretch on CA1
            app._queue(ev.LatencySampled(CA1, step_ms=40.0, bal_ms=400.0, playout_lag_ms=600.0, at=FIXED_NOW))
        await until(pilot, lambda: cell(app, CA1, "bal").endswith(" ms !!"))
        assert cell(app, CA1, "lag") == "600 ms !!"


# ----------------------------------------------------------------------------------- 10. mode
async def test_10_mode_says_who_holds_the_call_and_who_listens() -> None:
    app, link = _app(3)
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot)
        assert cell(app, CA2, "mode") == "OPER ops@console"
        app._queue(ev.CallUpdated(CA1, "operator", operator=link.actor, listeners=2, at=FIXED_NOW))
        await until(pilot, lambda: cell(app, CA1, "mode") == "OPER you ◉2")
    async with _app(3)[0].run_test(size=(80, 24)) as pilot:  # narrow: still not cut to "OPER"
        app2 = pilot.app
        await _ready(pilot)
        assert "ops@console" in cell(app2, CA2, "mode")


# --------------------------------------------------------------------------- 11. held calls
async def test_11_hang_up_names_the_holder_and_the_holder_is_told() -> None:
    app, link = _app(3)
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot)
        app.board.select_call(CA2)
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "ops@console holds call CA02f3e9" in app.screen.question
        await pilot.press("n")
        # This console holds CA1; another operator hangs it up: the holder gets a notice.
        app._queue(ev.CallUpdated(CA1, "operator", operator=link.actor, at=FIXED_NOW))
        await until(pilot, lambda: cell(app, CA1, "mode").startswith("OPER you"))
        app._queue(ev.CallEnded(CA1, "hung up by bob@desk", 60.0, at=FIXED_NOW))
        app._queue(ev.SupervisorActed("bob@desk", "hangup", CA1, "ok", at=FIXED_NOW))
        await until(pilot, lambda: "bob@desk hung up call CA01f3e9, which you held" in toasts(app))


# --------------------------------------------------------------------------------- 12. events
async def test_12_an_event_can_be_read_in_full() -> None:
    long = "Re: invoice for November " + "with a long explanation " * 12 + "THE END"
    link = ReplayLink([*busy_night(2), ev.MessageReceived("email", "u-1", long, at=FIXED_NOW)])
    app = XswarmApp(link, clock=lambda: FIXED_NOW)
    async with app.run_test(size=(100, 30)) as pilot:
        await _ready(pilot, 2)
        await pilot.press("e")
        assert app.feed_panel.show_cursor
        await pilot.press("G", "enter")
        await until(pilot, lambda: isinstance(app.screen, RecordScreen))
        assert "THE END" in str(app.screen.query_one("#record-text").render())
        await pilot.press("escape")
        assert app.screen is app.screen_stack[0]


def test_12_the_same_news_is_one_feed_line() -> None:
    state = ConsoleState()
    ready = ev.ModelStatusChanged(model="echo", state="ready", detail="", at=1.0)
    state.apply(ready)
    state.load_snapshot({"model": {"name": "echo", "state": "ready"}})  # attach: the snapshot says it again
    assert [i.text for i in state.feed] == ["model echo ready"]


async def test_12_a_hang_up_is_reported_once(echo_runtime: Runtime) -> None:
    runtime = echo_runtime
    link = EmbeddedLink(lambda: runtime, audio=lambda: "no audio")
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: runtime.model is not None and app.link_open)
        session = start_call(runtime)
        await until(pilot, lambda: session.call_id in app.board.rows)
        await pilot.press("x", "y")
        await until(pilot, lambda: any("ended:" in i.text for i in app.state.feed))
        (line,) = [i.text for i in app.state.feed if "ended:" in i.text]
        assert f"ended: hung up by {link.actor} after" in line and "hung up: hung up" not in line
    link.close()


# ------------------------------------------------------------------------------ smaller items
async def test_footer_keys_and_screens_show_only_what_works_there() -> None:
    app, _ = _app(2)
    async with app.run_test(size=(200, 40)) as pilot:
        await _ready(pilot, 2)
        assert {"reveal", "sort", "filter", "focus_calls", "focus_events", "users", "logs", "history"} <= _footer(app)
        for key in ("u", "L", "h"):
            await pilot.press(key)
            await pilot.pause(0.2)
            assert not _footer(app) & {"take_over", "hang_up", "listen", "mute"}, key
            await pilot.press("escape")


async def test_read_only_says_why_a_key_does_nothing_and_still_listens() -> None:
    app, link = _app(2, read_only=True)
    async with app.run_test(size=(200, 40)) as pilot:
        await _ready(pilot, 2)
        assert "listen" in _footer(app) and "take_over" not in _footer(app)  # monitors may listen
        await pilot.press("t")
        await until(pilot, lambda: "read-only" in toasts(app))
        assert "Take over is not available" in toasts(app) and link.sent == []


async def test_refusals_are_worded_for_operators_not_class_names() -> None:
    app, link = _app(2)
    link.refuse = "call CA01f3e9 is not held by you"
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot, 2)
        await pilot.press("b")
        await until(pilot, lambda: "refused" in toasts(app))
        assert "Hand back refused" in toasts(app) and "HandBack" not in toasts(app)


async def test_batch_shows_no_active_calls_once_the_last_one_ended() -> None:
    app, _ = _app(1)
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot, 1)
        panel = app.query_one("#system-text")
        assert "1 / 8 slots" in str(panel.render())
        app._queue(ev.CallEnded(CA1, "caller hung up", 60.0, at=FIXED_NOW))
        await until(pilot, lambda: "0 / 8 slots" in str(panel.render()))


async def test_a_theme_chosen_in_the_console_is_remembered(tmp_path: Path) -> None:
    saved: list[str] = []
    app, _ = _app(0, save_theme=saved.append)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.link_open)
        app.theme = "kitt"
        await pilot.pause(0.1)
    assert saved == ["kitt"]
    remember_theme(tmp_path, "kitt")
    assert remembered_theme(tmp_path) == "kitt"
    settings = load_settings()
    assert choose_theme(None, settings, tmp_path, list_themes()) == "kitt"
    assert choose_theme("glados", settings, tmp_path, list_themes()) == "glados"  # the flag wins
    explicit = load_settings(ui={"theme": "hal-9000"})
    assert choose_theme(None, explicit, tmp_path, list_themes()) == "hal-9000"  # so does the settings file


# ------------------------------------------------------------------------------- transfer
async def test_transfer_asks_showing_the_number_and_sends_it() -> None:
    app, link = _app(2, transfer_number="+15557654321")
    async with app.run_test(size=(140, 40)) as pilot:
        await _ready(pilot, 2)
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, TransferScreen))
        box = app.screen.query_one("#transfer-to")
        assert box.value == "+15557654321"  # type: ignore[attr-defined]
        box.value = "555-0100"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert isinstance(app.screen, TransferScreen) and link.sent == []  # not a number: not sent
        box.value = "+15550001111"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await until(pilot, lambda: bool(link.sent))
        assert link.sent == [ev.Transfer(app.board.selected_call or "", to="+15550001111")]
        await pilot.press("escape")


# --------------------------------------------------------------------------- records screens
async def test_history_inbox_and_audit_read_the_real_database(echo_runtime: Runtime) -> None:
    runtime = echo_runtime
    audio = RecordingAudio()
    link = EmbeddedLink(lambda: runtime, audio=lambda: audio)
    app = XswarmApp(link, reveal_callers=True)
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: runtime.model is not None and app.link_open)
        session = start_call(runtime, "CA" + "3" * 32, caller="+15551230001")
        await until(pilot, lambda: session.call_id in app.board.rows)
        await pilot.press("l", "x", "y")
        await until(pilot, lambda: session.ended)
        assert runtime.db is not None
        await until(pilot, lambda: bool(runtime.db.query("SELECT 1 FROM calls WHERE status = 'ended'")))
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, HistoryScreen) and session.call_id in app.screen.records)
        record = app.screen.records[session.call_id]
        assert record["caller"] == "+15551230001" and record["end_reason"].startswith("hung up by")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, EndedCallScreen) and app.screen.details is not None)
        text = str(app.screen.query_one("#record-text").render())
        assert f"listened    {link.actor}" in text and "took over   nobody" in text and "recording   none" in text
        await pilot.press("p")  # no recording: said, nothing else happens
        await until(pilot, lambda: "no recording" in toasts(app))
        # Its recording is uploaded (as the recorder does at call end): now it shows and plays.
        store = link.object_store()
        store.put_bytes(f"recordings/2026-12-04/{session.call_id}.wav", _stereo_wav(seconds=2))
        await pilot.press("escape", "enter")
        await until(pilot, lambda: isinstance(app.screen, EndedCallScreen) and app.screen.details is not None)
        assert "recording   recordings/2026-12-04/" in str(app.screen.query_one("#record-text").render())
        await pilot.press("p")
        await until(pilot, lambda: bool(audio.clips))
        assert audio.clips == [(48_000, 24_000)]  # both channels mixed to one, at the file's rate
        await pilot.press("escape", "escape", "a")
        await until(pilot, lambda: isinstance(app.screen, AuditScreen) and len(app.screen.records) >= 2)
        actions = [r["action"] for r in app.screen.records.values()]
        assert actions[:2] == ["hangup", "listen"]
        await pilot.press("escape", "i")
        await until(pilot, lambda: isinstance(app.screen, InboxScreen))
        await until(pilot, lambda: "nothing yet" in str(app.screen.query_one("#records-status").render()))
    link.close()


def _stereo_wav(seconds: float) -> bytes:
    import io
    import wave

    import numpy as np

    frames = (np.zeros((int(24_000 * seconds), 2)) + [1000, -1000]).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(24_000)
        wav.writeframes(frames.tobytes())
    return buf.getvalue()


# ------------------------------------------------------------------------------- personas
async def test_the_personas_greeting_is_the_first_thing_the_ai_says(echo_runtime: Runtime) -> None:
    """The call's theme (kitt, from the signed stream parameters) chooses the greeting."""
    from themes import load_theme

    runtime = echo_runtime
    said: list[ev.TranscriptAppended] = []
    runtime.bus.subscribe(lambda e: said.append(e) if isinstance(e, ev.TranscriptAppended) else None)
    link = EmbeddedLink(lambda: runtime, audio=lambda: "no audio")
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: runtime.model is not None and app.link_open)
        session = start_call(runtime)
        await until(pilot, lambda: any(e.call_id == session.call_id for e in said))
        first = next(e for e in said if e.call_id == session.call_id)
        assert first.speaker == "ai" and first.text == load_theme("kitt").persona.greeting
    link.close()
