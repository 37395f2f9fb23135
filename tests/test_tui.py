"""The console driven by Textual's Pilot against a real echo runtime with a real call in it.

Every key action goes through the real ``EmbeddedLink`` -> ``CallControl`` -> ``CallSession``
path, and the test checks what changed on the call, not just that a message was sent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tui_support import (
    FIXED_NOW,
    RecordingAudio,
    ReplayLink,
    busy_night,
    free_port,
    start_call,
    telephony_env,
    wait_until,
)
from tui_support import (
    cell as _cell,
)
from tui_support import (
    toasts as _toasts,
)
from tui_support import (
    until as _until,
)

from engine import events as ev
from engine.config import load_settings
from engine.runtime import Runtime
from themes import list_themes
from xswarm_tui.app import ACTING, XswarmApp
from xswarm_tui.link import AttachedLink, EmbeddedLink
from xswarm_tui.state import ConsoleState, mask_caller
from xswarm_tui.widgets.calls import CallBoard
from xswarm_tui.widgets.format import bar, duration, level_fraction

# ------------------------------------------------------------------------------- pure parts


def test_mask_caller_keeps_country_and_last_digits() -> None:
    assert mask_caller("+15550100123") == "+1•••••••123"
    assert mask_caller(None) == "—"
    assert mask_caller("123") == "•••"


def test_formatting_helpers() -> None:
    assert duration(59) == "00:59" and duration(3725) == "1:02:05"
    assert bar(0.5, 4) == "██  " and len(bar(0.33, 7)) == 7 and bar(2, 3) == "███"
    assert level_fraction(0.0) == 0.0 and level_fraction(1.0) == 1.0 and 0.4 < level_fraction(0.05) < 0.7


def test_state_folds_events_and_snapshots_idempotently() -> None:
    state = ConsoleState()
    for event in busy_night(3):
        state.apply(event)
    assert len(state.calls) == 3
    call = state.calls["CA02f3e9"]
    assert call.mode == "operator" and call.operator == "ops@console"
    assert call.bal_p50 == pytest.approx(138.5)
    assert {i.category for i in state.feed} >= {"sms", "email", "payment", "user", "error", "call", "model"}
    snap = {
        "calls": [
            {"call_id": "CA02f3e9", "slot": 1, "mode": "muted"},
            {"call_id": "CA77", "slot": 4, "source": "twilio", "caller": "+1", "started_at": 1.0},
            {"slot": "garbage"},
        ],
        "model": {"spec": "echo", "name": None, "state": "ready"},
    }
    state.load_snapshot(snap, taken_after=FIXED_NOW)
    state.load_snapshot(snap, taken_after=FIXED_NOW)
    assert set(state.calls) == {"CA02f3e9", "CA77"}  # CA01/CA03 ended during the reconnect
    state.apply(ev.CallStarted("CA88", 5, "twilio", at=FIXED_NOW + 1))  # newer than the snapshot: kept
    state.load_snapshot(snap, taken_after=FIXED_NOW)
    state.load_snapshot({"error": "snapshot incomplete"}, taken_after=FIXED_NOW + 10)
    assert set(state.calls) == {"CA02f3e9", "CA77", "CA88"}
    assert state.calls["CA02f3e9"].mode == "muted" and len(state.calls["CA02f3e9"].bal_ms) == 8
    assert state.model is not None and state.model.model == "echo"


# ----------------------------------------------------------------------- real runtime


def _board(app: XswarmApp) -> CallBoard:
    return app.query_one(CallBoard)


async def test_every_key_acts_on_a_real_call(echo_runtime: Runtime) -> None:
    runtime = echo_runtime
    audio = RecordingAudio()
    link = EmbeddedLink(lambda: runtime, audio=lambda: audio)
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: runtime.model is not None)
        session = start_call(runtime)
        cid = session.call_id
        await _until(pilot, lambda: cid in _board(app).rows)
        assert _cell(app, cid, "caller") == "+1•••••••123"
        assert _cell(app, cid, "mode") == "AI"

        await pilot.press("t")  # take over: the session is ours, the microphone feeds it
        await _until(pilot, lambda: session.operator == link.actor)
        await _until(pilot, lambda: _cell(app, cid, "mode") == "OPER you")
        assert audio.mic_sink is not None

        await pilot.press("b")  # hand back
        await _until(pilot, lambda: session.operator is None and _cell(app, cid, "mode") == "AI")
        assert audio.mic_sink is None

        await pilot.press("l")  # listen: a tap on the session delivers both directions
        await _until(pilot, lambda: len(session.taps) == 1 and len(audio.played) >= 4)
        assert {d for d, _ in audio.played} == {"caller", "ai"} and audio.played[0][1] == 1920
        await pilot.press("l")
        await _until(pilot, lambda: not session.taps and not audio.speakers)

        await pilot.press("m")
        await _until(pilot, lambda: session.muted and _cell(app, cid, "mode") == "MUTED")
        await pilot.press("m")
        await _until(pilot, lambda: not session.muted)

        await pilot.press("w")
        await pilot.press(*"offer a callback")
        await pilot.press("enter")
        await _until(pilot, lambda: any("whisper → ok" in i.text for i in app.state.feed))

        await pilot.press("r")  # reveal the number
        await _until(pilot, lambda: _cell(app, cid, "caller") == "+15550100123")

        await pilot.press("slash", *"nomatch")
        await _until(pilot, lambda: cid not in _board(app).rows)
        await pilot.press("escape")
        await _until(pilot, lambda: cid in _board(app).rows)

        await pilot.press("s")
        assert _board(app).sort_name == "bal"

        await pilot.press("p")  # pause: collection continues, drawing stops
        assert "PAUSED" in app.sub_title
        await pilot.press("p")
        assert "PAUSED" not in app.sub_title

        await pilot.press("enter")  # call detail
        await pilot.pause(0.3)
        assert app.screen.__class__.__name__ == "CallDetailScreen"
        await pilot.press("escape")

        await pilot.press("x", "n")  # hang up asks first; "no" leaves the call alone
        await pilot.pause(0.4)
        assert not session.ended
        await pilot.press("x", "y")
        await _until(pilot, lambda: session.ended and cid not in _board(app).rows)

        await pilot.press("v")  # a local conversation needs a sound card; without one the console says why
        await _until(
            pilot, lambda: "no audio" in _toasts(app) or any(c.source == "local" for c in app.state.calls.values())
        )

        await pilot.press("q")
        if app.is_running:  # the local call is live: quitting asks first
            await pilot.press("y")
    link.close()
    rows = runtime.db.query("SELECT action, result FROM audit_log ORDER BY id") if runtime.db else []
    actions = [a for a, r in rows if r == "ok"]
    assert actions[:8] == ["takeover", "handback", "listen", "unlisten", "mute", "unmute", "whisper", "hangup"]


async def test_no_audio_device_is_said_and_the_console_carries_on(echo_runtime: Runtime) -> None:
    runtime = echo_runtime
    link = EmbeddedLink(lambda: runtime, audio=lambda: "no audio: PortAudio library not found")
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: runtime.model is not None)
        session = start_call(runtime)
        await _until(pilot, lambda: session.call_id in _board(app).rows)
        await pilot.press("l")
        await _until(pilot, lambda: "PortAudio" in _toasts(app))
        assert not session.taps
        await pilot.press("t")  # takeover still works; the operator is told the caller hears silence
        await _until(pilot, lambda: session.operator is not None and "silence" in _toasts(app))
    link.close()


async def test_users_and_logs_screens(echo_runtime: Runtime) -> None:
    runtime = echo_runtime
    link = EmbeddedLink(lambda: runtime, audio=lambda: "no audio")
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: runtime.model is not None)
        runtime.db.write(
            "INSERT INTO users (id, name, phone, tier, created_at, updated_at) "
            "VALUES ('u-ada', 'Ada', '+15550100123', 'pro', 1, 1)"
        )
        runtime.db.write(
            "INSERT INTO usage (user_id, period, voice_seconds, sms_count) "
            "VALUES ('u-ada', strftime('%Y-%m', 'now'), 600, 4)"
        )
        await pilot.press("u")
        await _until(pilot, lambda: "1 users" in str(app.screen.query_one("#users-status").render()))
        table = app.screen.query_one("#users-table")
        assert [str(c) for c in table.get_row("u-ada")] == ["u-ada", "Ada", "pro", "+15550100123", "10.0", "4", "0"]
        await pilot.press("escape", "L")
        await _until(pilot, lambda: any("first paint" in line for _, line in app.log_mirror.lines))
        await _until(pilot, lambda: len(app.screen.query_one("#log-view").lines) > 0)
    link.close()


async def test_read_only_hides_every_acting_key() -> None:
    link = ReplayLink(list(busy_night(2)))
    app = XswarmApp(link, read_only=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        shown = {b.binding.action for b in app.screen.active_bindings.values() if b.enabled and b.binding.show}
        assert not shown & ACTING
        assert {"pause", "help", "quit"} <= shown
        await pilot.press("t", "x", "m", "l", "w", "v", "b")
        await pilot.pause(0.2)
        assert link.sent == []
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        help_text = app.screen.query_one("#help-body Markdown").source
        assert "Pause" in help_text and "Take over" not in help_text and "Hang up" not in help_text
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert not any("take over" in t or "hang up" in t for t in titles)


async def test_help_lists_the_keys_and_palette_reaches_every_action() -> None:
    link = ReplayLink(list(busy_night(2)))
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        text = app.screen.query_one("#help-body Markdown").source
        for words in ("Take over", "Hand back", "Listen", "Whisper", "Mute", "Hang up", "Voice", "Pause", "Quit"):
            assert f"| {words} |" in text
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for action in ("take over", "hand back", "listen", "whisper", "mute", "hang up", "transfer"):
            assert f"call CA01f3e9: {action}" in titles
        assert {"view: pause", "view: users", "view: logs", "call: start a local voice conversation"} <= titles
        assert {"view: history", "view: inbox", "view: audit"} <= titles
        assert any(t.lower().startswith("theme") for t in titles)  # Textual's "Change theme" stays
        assert set(app.available_themes) == set(list_themes())  # only ours in the picker, not Textual's 20
        for theme in ("hal-9000", "kitt", "glados"):
            app.theme = theme
            await pilot.pause(0.1)
            assert len(app.board.rows) == 2 and app.theme_variables["call-live"]
        await pilot.press("ctrl+p")
        await pilot.press(*"CA02f3e9 mute")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await _until(pilot, lambda: bool(link.sent))
        assert link.sent == [ev.Mute("CA02f3e9")] or link.sent == [ev.Unmute("CA02f3e9")]


# ------------------------------------------------------------------------- attached mode

OPERATOR_TOKEN = "op-" + "k" * 29
MONITOR_TOKEN = "mon-" + "m" * 28


@pytest.fixture
def served_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A started runtime with its real supervisor server on a free local port."""
    monkeypatch.setenv("XSWARM_SUPERVISOR_TOKEN", OPERATOR_TOKEN)
    monkeypatch.setenv("XSWARM_SUPERVISOR_MONITOR_TOKEN", MONITOR_TOKEN)
    telephony_env(monkeypatch)
    rt = Runtime(
        load_settings(), model_spec="echo", bridge_port=free_port(), supervisor_port=free_port(), webhooks_port=0
    )
    rt.start()
    wait_until(lambda: rt.model is not None)
    yield rt
    rt.stop()


async def test_attached_console_acts_over_the_supervisor_socket(served_runtime: Runtime) -> None:
    rt = served_runtime
    session = start_call(rt)
    audio = RecordingAudio()
    link = AttachedLink(f"ws://127.0.0.1:{rt.supervisor_port}/", OPERATOR_TOKEN, audio=lambda: audio)
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        cid = session.call_id
        await _until(pilot, lambda: cid in _board(app).rows)  # from the socket's snapshot
        assert "attached" in app.sub_title
        await _until(pilot, lambda: app.system_panel.state.tick is not None)  # live events flow
        await pilot.press("t")
        await _until(pilot, lambda: session.operator == link.actor)
        await _until(pilot, lambda: _cell(app, cid, "mode") == "OPER you")
        assert audio.mic_sink is not None
        await pilot.press("b")
        await _until(pilot, lambda: session.operator is None)
        await pilot.press("l")  # audio comes over the socket to this machine's speakers
        await _until(pilot, lambda: len(audio.played) >= 4)
        await pilot.press("l")
        await _until(pilot, lambda: not session.taps)
        await pilot.press("u")
        await _until(pilot, lambda: "not available" in str(app.screen.query_one("#users-status").render()))
        await pilot.press("escape")
        await pilot.press("x", "y")
        await _until(pilot, lambda: session.ended and cid not in _board(app).rows)
    link.close()


async def test_attached_with_a_monitor_token_is_read_only(served_runtime: Runtime) -> None:
    rt = served_runtime
    session = start_call(rt)
    link = AttachedLink(f"ws://127.0.0.1:{rt.supervisor_port}/", MONITOR_TOKEN, audio=lambda: "no audio")
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: session.call_id in _board(app).rows)
        await _until(pilot, lambda: app.read_only)
        shown = {b.binding.action for b in app.screen.active_bindings.values() if b.binding.show and b.enabled}
        assert not shown & ACTING
        await pilot.press("t")
        await pilot.pause(0.3)
        assert session.operator is None
    link.close()


async def test_a_dead_node_says_disconnected_at_once_and_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 3: nothing listening yet: the header says so at once (never "0 live"), the figures
    are greyed, and the console keeps trying, so it connects when the node comes up."""
    port = free_port()
    link = AttachedLink(f"ws://127.0.0.1:{port}/", OPERATOR_TOKEN, audio=lambda: "no audio", open_timeout_s=3)
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: "disconnected" in app.sub_title or "retrying in" in app.sub_title, timeout=3)
        assert "0 live" not in app.sub_title and app.board.has_class("disconnected")
        monkeypatch.setenv("XSWARM_SUPERVISOR_TOKEN", OPERATOR_TOKEN)
        telephony_env(monkeypatch)
        rt = Runtime(load_settings(), model_spec="echo", bridge_port=free_port(), supervisor_port=port, webhooks_port=0)
        rt.start()
        try:
            await _until(pilot, lambda: "0 live" in app.sub_title, timeout=20)
            assert not app.board.has_class("disconnected")
            rt.stop()  # the node goes away: said at once, not 15 s later
            await _until(pilot, lambda: "disconnected" in app.sub_title, timeout=5)
            await _until(pilot, lambda: app.system_panel.has_class("disconnected"), timeout=2)
            assert "0 live" not in app.sub_title and "figures are stale" in app.sub_title
        finally:
            rt.stop()
    link.close()


async def test_a_refused_token_offers_retry_or_quit(served_runtime: Runtime) -> None:
    """Item 7: what only the operator can fix is a dialog with the fix, not an empty shell."""
    from xswarm_tui.screens.failed import RuntimeFailedScreen

    link = AttachedLink(
        f"ws://127.0.0.1:{served_runtime.supervisor_port}/", "wrong-token-0123456789", audio=lambda: "x"
    )
    app = XswarmApp(link)
    async with app.run_test(size=(120, 40)) as pilot:

        def shown_text() -> str:
            return " ".join(str(w.render()) for w in app.screen.query("Static"))

        await _until(pilot, lambda: isinstance(app.screen, RuntimeFailedScreen), timeout=8)
        await _until(pilot, lambda: bool(shown_text()), timeout=5)  # pushed, then composed
        text = shown_text()
        assert "refused the token" in text and "xswarm supervisor" in text
        shown = {b.binding.action for b in app.screen_stack[0].active_bindings.values() if b.binding.show}
        assert "take_over" not in app.screen_stack[0].active_bindings or not app._allowed(
            "take_over", app.screen_stack[0]
        )
        assert "not running" in app.sub_title and shown
        await pilot.press("q")
        await pilot.pause(0.2)
        assert not app.is_running
    link.close()


# ----------------------------------------------------------------------------- the command


def test_attach_command_checks_its_url_before_starting_anything() -> None:
    from typer.testing import CliRunner

    from xswarm_tui.cli import app as cli

    result = CliRunner().invoke(cli, ["attach", "http://127.0.0.1:9999", "--token", "t" * 32])
    assert result.exit_code == 2
    assert "must start with ws:// or wss://" in result.output
    result = CliRunner().invoke(cli, ["attach", "ws://127.0.0.1:9999"])
    assert result.exit_code == 2 and "--token" in result.output


async def test_filter_text_is_shown_as_typed_never_as_markup() -> None:
    """The filter goes into the panel titles; ``[/]`` used to raise MarkupError there, and
    ``[@click=…]`` would have become a clickable action."""
    from textual.content import Content

    app = XswarmApp(ReplayLink(list(busy_night(2))))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        for panel in (app.board, app.feed_panel):
            for typed in ("[/]", "[@click=app.quit]x[/]", "[bold"):
                panel.set_filter(typed)
                await pilot.pause(0.05)
                assert f"filter “{typed}”" in Content.from_markup(panel.border_title or "").plain
                assert app.is_running
            panel.set_filter("")
        await pilot.pause(0.1)
        assert app.is_running and app.return_code is None


# ------------------------------------------------------------------- headroom and missed ticks

SLOW = "model has no headroom: step p90 95 ms of the 80 ms tick"


def test_state_knows_when_admission_is_paused_for_headroom() -> None:
    from xswarm_tui.state import HEADROOM_HOLD_S

    state = ConsoleState()
    state.load_snapshot({"slots": {"total": 4, "no_headroom": SLOW}, "server_time": FIXED_NOW})
    assert state.admission_paused(FIXED_NOW + 1) == SLOW
    assert state.admission_paused(FIXED_NOW + HEADROOM_HOLD_S + 1) is None  # old news is not shown as current
    state.apply(ev.CallStarted("CA1", 0, "twilio", at=FIXED_NOW + 2))  # admitted: headroom is back
    assert state.admission_paused(FIXED_NOW + 3) is None
    state.apply(ev.CallRefused("no_headroom", "model has no headroom: 7 ticks missed in 10 s", at=FIXED_NOW + 4))
    assert state.admission_paused(FIXED_NOW + 5) == "model has no headroom: 7 ticks missed in 10 s"
    state.load_snapshot({"slots": {"no_headroom": None}, "server_time": FIXED_NOW + 3})  # older than the refusal
    assert state.admission_paused(FIXED_NOW + 5) is not None
    state.load_snapshot({"slots": {"no_headroom": None}, "server_time": FIXED_NOW + 6})
    assert state.admission_paused(FIXED_NOW + 7) is None
    state.apply(ev.CallRefused("no free slot", "+1•••123", at=FIXED_NOW + 8))  # other refusals pause nothing
    assert state.admission_paused(FIXED_NOW + 9) is None


async def test_system_panel_shows_missed_ticks_and_paused_admission() -> None:
    events = [
        *busy_night(2),
        ev.TickSampled(step_ms_p50=91.0, step_ms_max=140.0, active=2, slots=8, missed_ticks=7, at=FIXED_NOW - 1),
        ev.CallRefused("no_headroom", SLOW, at=FIXED_NOW - 0.5),
    ]
    app = XswarmApp(ReplayLink(events), clock=lambda: FIXED_NOW)
    async with app.run_test(size=(120, 40)) as pilot:
        panel = app.query_one("#system-text")
        await _until(pilot, lambda: "Admission paused" in str(panel.render()))
        text = str(panel.render())
        assert "missed 7" in text
        assert "Admission paused: model has no headroom" in text and "step p90 95 ms of the 80 ms tick" in text


async def test_tick_budget_counts_the_whole_tick_not_only_the_model_step() -> None:
    events = [
        *busy_night(1),
        ev.TickSampled(
            step_ms_p50=20.0,
            step_ms_max=30.0,
            active=1,
            slots=8,
            missed_ticks=0,
            tick_work_ms_p50=72.0,
            tick_work_ms_max=75.0,
            at=FIXED_NOW - 1,
        ),
    ]
    app = XswarmApp(ReplayLink(events), clock=lambda: FIXED_NOW)
    async with app.run_test(size=(120, 40)) as pilot:
        panel = app.query_one("#system-text")
        await _until(pilot, lambda: "of 80 ms" in str(panel.render()))
        text = str(panel.render())
        assert " 90% of 80 ms" in text and "step p50 20.0 ms" in text
