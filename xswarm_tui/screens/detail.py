"""Call detail: latency sparklines, level meters, live AI transcript, DTMF, supervisor actions."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.signal import Signal
from textual.widgets import Footer, Header, Label, RichLog, Sparkline, Static

from xswarm_tui.state import CLOCK, CallView, ConsoleState, StateChanged, mask_caller
from xswarm_tui.widgets.format import bar, duration, level_fraction, ms

SPARKS = (("step", "step time", "step_ms"), ("bal", "bridge-added latency", "bal_ms"), ("lag", "playout lag", "lag_ms"))


class CallDetailScreen(Screen[None]):
    """One call up close. The acting keys are the app's and act on this call."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="detail.back")]
    BINDING_GROUP_TITLE = "Call detail"

    def __init__(
        self,
        call_id: str,
        state: ConsoleState,
        clock: Callable[[], float],
        reveal: bool,
        changes: Signal[StateChanged],
    ) -> None:
        super().__init__()
        self.call_id = call_id
        self.state = state
        self.clock = clock
        self.reveal = reveal
        self._changes = changes
        self._transcript_seen = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="detail-top"):
            with Vertical(id="detail-info", classes="panel"):
                yield Static(id="detail-text")
            with Vertical(id="detail-latency", classes="panel"):
                for key, label, _ in SPARKS:
                    yield Label(label, id=f"label-{key}")
                    yield Sparkline([], id=f"spark-{key}")
        with Horizontal(id="detail-bottom"):
            yield RichLog(id="transcript", classes="panel", wrap=True, markup=False, max_lines=2000)
            yield Static(id="actions", classes="panel")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#detail-info").border_title = "Call"
        self.query_one("#detail-latency").border_title = "Latency, last 30 s"
        self.query_one("#transcript").border_title = "Transcript"
        self.query_one("#actions").border_title = "Supervisor actions"
        self.refresh_detail()
        self._changes.subscribe(self, self._state_changed, immediate=True)

    def _state_changed(self, change: StateChanged) -> None:
        if CLOCK in change.parts or self.call_id in change.calls:
            self.refresh_detail()

    @property
    def call(self) -> CallView | None:
        return self.state.calls.get(self.call_id)

    def refresh_detail(self) -> None:
        call = self.call
        text = self.query_one("#detail-text", Static)
        if call is None:
            text.update(Text(f"Call {self.call_id} has ended.", style="bold"))
            return
        c = self.app.theme_variables
        out = Text()
        caller = (call.caller or "—") if self.reveal else mask_caller(call.caller)
        out.append(f"{call.call_id}\n", style="bold")
        out.append(f"caller {caller if call.source != 'local' else 'local microphone'}  user {call.user_id or '—'}\n")
        out.append(f"theme {call.theme or '—'}  slot {call.slot}  {duration(self.clock() - call.started_at)}\n")
        out.append(f"mode {call.mode}" + (f" ({call.operator})" if call.operator else ""))
        out.append(f"  listeners {call.listeners}  late frames {call.late_frames}\n")
        out.append("caller ")
        out.append(bar(level_fraction(call.in_level), 20), style=c.get("level-caller", ""))
        out.append("\nAI     ")
        out.append(bar(level_fraction(call.out_level), 20), style=c.get("level-ai", ""))
        out.append(f"\nDTMF {call.dtmf or '—'}")
        text.update(out)
        for key, label, attr in SPARKS:
            series = list(getattr(call, attr))
            last = ms(series[-1]) if series else "—"
            self.query_one(f"#label-{key}", Label).update(f"{label}: {last}")
            self.query_one(f"#spark-{key}", Sparkline).data = series
        log = self.query_one("#transcript", RichLog)
        pieces = list(call.transcript)
        for speaker, piece in pieces[self._transcript_seen :]:
            log.write(Text(piece, style=c.get("level-ai" if speaker == "ai" else "level-caller", "")), scroll_end=True)
        self._transcript_seen = len(pieces)
        self.query_one("#actions", Static).update("\n".join(call.actions) or "none yet")
