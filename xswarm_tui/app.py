"""The operator console: one Textual app over a ``Link`` (embedded runtime or supervisor socket).

Data path: the link calls ``_on_runtime_event`` on whatever thread publishes; it only appends
to a deque and posts one coalescing ``EventsArrived``. The UI thread drains the deque into
``ConsoleState`` and redraws at most 4 times a second, touching only rows and panels that
changed. Pausing keeps the fold running and skips the drawing, so un-pausing is instant and
nothing is lost.

First paint never waits for the runtime: the link is opened in a thread worker after mount
(building the runtime is what imports torch), and the model's progress arrives as events.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.events import Key
from textual.screen import ModalScreen, Screen
from textual.signal import Signal
from textual.theme import Theme as TextualTheme
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Input
from textual.worker import Worker, WorkerState

from engine import events as ev
from engine.logging_setup import add_mirror
from engine.snapshot import prepare_reader
from themes import DEFAULT_THEME, ThemeError, list_themes, load_theme
from xswarm_tui.link import Link, LinkError
from xswarm_tui.messages import EventsArrived, LinkFailed, LinkOpened, LogsArrived
from xswarm_tui.screens.detail import CallDetailScreen
from xswarm_tui.screens.dialogs import ConfirmScreen, TransferScreen, WhisperScreen
from xswarm_tui.screens.failed import RuntimeFailedScreen
from xswarm_tui.screens.logs import LogMirror, LogsScreen
from xswarm_tui.screens.records import AuditScreen, HistoryScreen, InboxScreen, RecordScreen
from xswarm_tui.screens.users import UsersScreen
from xswarm_tui.state import CLOCK, ConsoleState, Snapshot, StateChanged
from xswarm_tui.widgets.calls import CallBoard
from xswarm_tui.widgets.empty import EmptyBoard, empty_board_text
from xswarm_tui.widgets.feed import EventsFeed
from xswarm_tui.widgets.telemetry import SystemPanel

log = logging.getLogger("xswarm.tui")

RENDER_INTERVAL_S = 0.25
"""At most 4 redraws a second, however fast samples arrive (12.5 Hz per call at most)."""
BUSY_RENDER_INTERVAL_S = 0.5
BUSY_CALLS = 16
"""Above this many live calls, redraw at 2 Hz. Why: every redraw of the calls table renders all
its visible cells, and the UI thread shares the GIL with the bridge (docs/performance.md,
"Runtime and console")."""
DEBOUNCE_S = 0.3
"""A second press of a destructive key within this is ignored (key repeat, double taps)."""

ACTING = frozenset({"take_over", "hand_back", "whisper", "mute", "hang_up", "local_call", "transfer"})
"""Actions that change a call; `--read-only` and monitor tokens hide them everywhere."""
CALL_ACTIONS = ACTING | {"listen"}
"""Actions on the selected call: offered only on the board and the call detail, once the
runtime is up (never on the Users, Logs or records screens, or over a failed start)."""
RETRY_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Backoff between attempts to reach a node that did not answer (the last one repeats)."""


def _binding(
    key: str,
    action: str,
    description: str,
    tooltip: str,
    *,
    show: bool = True,
    priority: bool = False,
    group: str = "call",
) -> Binding:
    return Binding(key, action, description, show=show, priority=priority, id=f"{group}.{action}", tooltip=tooltip)


KEYS: list[Binding] = [
    # Help and quit first: the footer cuts from the right on a narrow terminal.
    _binding("question_mark,f1", "help", "Help", "Keys and how to read the panels", group="view"),
    _binding("q", "quit", "Quit", "Leave the console (asks first while calls are live)", group="app"),
    _binding("t", "take_over", "Take over", "Your microphone replaces the AI on the selected call"),
    _binding("b", "hand_back", "Hand back", "Give the selected call back to the AI"),
    _binding("l", "listen", "Listen", "Hear the selected call on this machine (press again to stop)"),
    _binding("w", "whisper", "Whisper", "Type a line the AI takes into account on the selected call"),
    _binding("m", "mute", "Mute", "Mute or unmute the AI on the selected call (it keeps listening)"),
    _binding("x", "hang_up", "Hang up", "End the selected call (asks first)"),
    _binding("f", "transfer", "Transfer", "Transfer the selected call to a number (asks, showing the number)"),
    _binding("v", "local_call", "Voice", "Talk to the AI through this machine's microphone and speakers"),
    _binding("p", "pause", "Pause", "Freeze the panels; data keeps being collected", group="view"),
    _binding("r", "reveal", "Reveal", "Show or mask callers' phone numbers", group="view"),
    _binding("s", "sort", "Sort", "Cycle the calls board's sort order (S reverses it)", group="view"),
    _binding("S", "reverse_sort", "Reverse", "Reverse the calls board's sort order", show=False, group="view"),
    _binding("slash", "filter", "Filter", "Filter the focused panel (escape clears)", group="view"),
    _binding("c", "focus_calls", "Calls", "Focus the calls board", group="view"),
    _binding("e", "focus_events", "Events", "Focus the events feed (enter shows an event in full)", group="view"),
    _binding("h", "history", "History", "Ended calls: times, end reason, latency, recording", group="view"),
    _binding("i", "inbox", "Inbox", "Voicemail, SMS and email", group="view"),
    _binding("a", "audit", "Audit", "Every supervisor action and failed login", group="view"),
    _binding("n", "focus_nodes", "Nodes", "Focus the nodes panel (fleet console; d drains)", group="view"),
    _binding("u", "users", "Users", "Users with tier and this month's usage", group="view"),
    _binding("L", "logs", "Logs", "The log records of this session", group="view"),
]
"""Every key of the console, as data: the footer, help and palette are built from these."""
BINDINGS: list[BindingType] = list(KEYS)


DASHBOARD_ACTIONS = frozenset(b.action for b in KEYS if b.action not in CALL_ACTIONS | {"help", "quit"})
"""The dashboard's own keys (sort, filter, screens …): offered on the board and the call detail only."""
ACTING_KEYS = {
    key: binding.description for binding in KEYS if binding.action in ACTING for key in binding.key.split(",")
}
"""Keys of the acting bindings, for the read-only notice."""
COMMAND_WORDS: dict[type, str] = {
    ev.TakeOver: "take over",
    ev.HandBack: "hand back",
    ev.Listen: "listen",
    ev.Unlisten: "stop listening",
    ev.Whisper: "whisper",
    ev.Mute: "mute",
    ev.Unmute: "unmute",
    ev.HangUp: "hang up",
    ev.Transfer: "transfer",
    ev.StartLocalCall: "local voice call",
}
"""What each command is called in toasts (never the class name)."""


def textual_theme(name: str) -> TextualTheme:
    """A ``themes/`` file as a Textual theme: palette plus the domain colours as variables."""
    t = load_theme(name)
    colours: dict[str, Any] = dict(t.palette)  # themes.PALETTE_KEYS: all of them Theme's colour parameters
    return TextualTheme(name=t.name, dark=t.dark, variables=dict(t.variables), **colours)


class XswarmApp(App[None]):
    CSS_PATH = Path(__file__).with_name("xswarm.tcss")  # absolute: subclasses elsewhere still find it
    TITLE = "xswarm"
    BINDINGS = BINDINGS
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (34, "-tall")]
    """Screen classes the stylesheet uses to fit 80x24: a narrower system panel, a shorter bottom row."""

    def __init__(
        self,
        link: Link,
        *,
        read_only: bool = False,
        theme: str = DEFAULT_THEME,
        clock: Callable[[], float] = time.time,
        poll_interval_s: float = 1.0,
        reveal_callers: bool = False,
        started_at: float | None = None,
        transfer_number: str | None = None,
        save_theme: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self._started_at = time.perf_counter() if started_at is None else started_at
        """perf_counter() at the process's start, for the time-to-first-paint log line."""
        self.link = link
        self.read_only = read_only or not link.can_act
        self._read_only_flag = read_only
        """Read-only because the operator asked (else because the token only permits watching)."""
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self.state = ConsoleState()
        self.paused = False
        """True while the operator froze the panels (collection goes on)."""
        self.listening: set[str] = set()
        self._inbox: deque[ev.Event | Snapshot] = deque()
        self._wake_posted = False
        self._last_render = 0.0
        self._render_timer: Timer | None = None
        self._last_press: dict[str, float] = {}
        self._reveal = reveal_callers
        self.log_mirror = LogMirror(lambda: self.post_message(LogsArrived()))
        self._remove_mirror: Callable[[], None] = lambda: None
        self._theme_name = theme
        self.transfer_number = transfer_number
        """Prefilled in the transfer dialog (``twilio.transfer_number``)."""
        self._save_theme = save_theme
        """Remembers a theme chosen in the palette for the next start (None: not saved)."""
        self.link_open = False
        """True once the runtime answered; call actions are offered only then."""
        self._attempt = 0
        """Failed attempts to reach the runtime in a row (the retry backoff's index)."""
        self._retry_at: float | None = None
        """monotonic() of the next attempt to reach a node that did not answer."""
        self._failed = False
        """True while the failure screen waits for the operator (retry or quit)."""
        self.animation_level = "none"  # suits SSH; nothing here needs motion
        self.state_changed: Signal[StateChanged] = Signal(self, "state-changed")
        """Published at each redraw and once a second; every panel subscribes for its part."""
        self.board = CallBoard(
            self.state, self.clock, self.state_changed, id="calls", node_of=getattr(link, "node_of", None)
        )
        self.system_panel = SystemPanel(self.state, self.clock, self.poll_interval_s, self.state_changed, id="system")
        self.nodes_panel = None
        if hasattr(link, "node_command"):  # a fleet: the nodes panel takes the one-node system panel's place
            from xswarm_tui.widgets.nodes import NodesPanel

            self.nodes_panel = NodesPanel(link, self.clock, read_only=self.read_only, id="nodes")
            self.system_panel.display = False
        self.feed_panel = EventsFeed(self.state, self.state_changed, id="events")
        """The dashboard's panels, kept by reference: they stay put while other screens are on top."""

    # ------------------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Vertical(id="calls-area"):
            yield Input(placeholder="filter calls (escape clears)", id="calls-filter", classes="filter")
            yield self.board
            yield EmptyBoard(id="calls-empty")
        with Horizontal(id="bottom"):
            yield self.system_panel
            if self.nodes_panel is not None:
                yield self.nodes_panel
            with Vertical(id="events-area"):
                yield Input(
                    placeholder="filter events: sms, payment, error, any word", id="events-filter", classes="filter"
                )
                yield self.feed_panel
        yield Footer(compact=True)

    def get_theme_variable_defaults(self) -> dict[str, str]:
        """Textual's own themes lack our domain colours: borrow the default theme's."""
        return dict(load_theme(DEFAULT_THEME).variables)

    def on_mount(self) -> None:
        self._register_themes()
        board = self.board
        board.reveal = self._reveal
        board.me = self.state.me = self.link.actor
        board.focus()
        self._refresh_empty_state()
        self._update_subtitle()
        self._remove_mirror = add_mirror(self.log_mirror)
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        self.set_interval(1.0, self._every_second)
        self.call_after_refresh(self._first_paint)

    def _first_paint(self) -> None:
        """The dashboard is on screen: only now start the runtime, so it never delays the paint."""
        log.info(
            "first paint %.0f ms after start (torch imported: %s)",
            (time.perf_counter() - self._started_at) * 1000,
            "torch" in sys.modules,
        )
        self._open_link()

    def on_unmount(self) -> None:
        self._remove_mirror()

    def _theme_changed(self, theme: TextualTheme) -> None:
        self._render_all()
        if self._save_theme is not None and theme.name != self._theme_name:
            self._theme_name = theme.name
            try:
                self._save_theme(theme.name)
            except Exception as exc:  # an unwritable settings file must not break the console
                log.warning("could not save the theme choice: %s", exc)
                self.notify(f"theme not saved: {exc}", severity="warning", markup=False)

    def _register_themes(self) -> None:
        ours = []
        for name in list_themes():
            try:
                self.register_theme(textual_theme(name))
                ours.append(name)
            except ThemeError as exc:  # one bad user file: say so, keep the others
                self.notify(str(exc), title="Theme skipped", severity="warning", timeout=10, markup=False)
        try:
            self.theme = self._theme_name
        except Exception:  # InvalidThemeError: unknown name in the settings
            self.notify(f"unknown theme {self._theme_name!r}; using {DEFAULT_THEME}", severity="warning", markup=False)
            self.theme = self._theme_name = DEFAULT_THEME
        # Only xswarm's themes in the picker (after ours is active): Textual's ~20 built-ins
        # lack the call and latency colours and crowd the list. User theme files count as ours.
        for name in [n for n in self.available_themes if n not in ours]:
            self.unregister_theme(name)

    # ----------------------------------------------------------------- runtime link
    @work(thread=True, exclusive=True, group="link", exit_on_error=False, description="Starting the runtime")
    def _open_link(self) -> None:
        opened_at = time.time()
        prepare_reader()  # here, off the UI thread, which reads the snapshot next
        try:
            snapshot = self.link.open(self._on_runtime_event, self._on_snapshot)
        except Exception as exc:  # LinkError, a port in use, a bad token: shown, the app stays up
            log.exception("runtime link failed")
            self.post_message(LinkFailed(str(exc) or type(exc).__name__, retry=getattr(exc, "retry", False)))
            return
        self._queue(Snapshot(snapshot, opened_at))
        self.post_message(LinkOpened())

    def _on_runtime_event(self, event: ev.Event) -> None:
        """Bus subscriber, any thread: queue and wake the UI once; never block the publisher."""
        self._queue(event)

    def _on_snapshot(self, snapshot: dict) -> None:
        """A reconnect brought a fresh snapshot (any thread); the server's clock dates it."""
        self._queue(Snapshot(snapshot, snapshot.get("server_time")))

    def _queue(self, item: ev.Event | Snapshot) -> None:
        """Snapshots travel in the same queue as events, so the fold sees them in arrival order."""
        self._inbox.append(item)
        if not self._wake_posted:
            self._wake_posted = True
            self.post_message(EventsArrived())

    @on(LinkOpened)
    def _link_opened(self) -> None:
        self.link_open = True
        self._attempt, self._retry_at = 0, None
        if not self.link.can_act and not self.read_only:  # a monitor token: act as --read-only
            self.read_only = True
        self.board.me = self.state.me = self.link.actor  # the server's name for this console
        self.refresh_bindings()
        self._show_health()
        self._update_subtitle()

    @on(LinkFailed)
    def _link_failed(self, message: LinkFailed) -> None:
        """A node that did not answer is tried again with backoff (the header counts down);
        anything only the operator can fix (a refused token, a busy port) asks: retry or quit."""
        if message.retry:
            self._retry_at = time.monotonic() + RETRY_S[min(self._attempt, len(RETRY_S) - 1)]
            self._attempt += 1
            self._update_subtitle()
            return
        self._failed = True
        self.sub_title = f"{self.link.kind}: {self.link.target} · not running"
        title = "The runtime did not start" if self.link.kind == "embedded" else f"{self.link.target} refused us"

        def answer(choice: str | None) -> None:
            if choice == "retry":
                self._failed = False
                self._update_subtitle()
                self._open_link()
            else:
                self.exit()

        self.push_screen(RuntimeFailedScreen(title, message.error), answer)

    @on(EventsArrived)
    def _events_arrived(self) -> None:
        self._wake_posted = False
        interval = BUSY_RENDER_INTERVAL_S if len(self.state.calls) > BUSY_CALLS else RENDER_INTERVAL_S
        wait = interval - (time.monotonic() - self._last_render)
        if wait <= 0:
            self._drain()
        elif self._render_timer is None:
            self._render_timer = self.set_timer(wait, self._drain)

    def _drain(self) -> None:
        self._render_timer = None
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, Snapshot):
                self.state.load_snapshot(item.data, taken_after=item.taken_after)
            else:
                self.state.apply(item)
        for notice in self.state.notices:  # told even while paused: it is about this operator's call
            self.notify(notice, title="A call you held", severity="warning", timeout=20, markup=False)
        self.state.notices.clear()
        if not self.paused and self.board.is_attached:  # not after the app has begun to close
            self._render_dirty()
            self._refresh_empty_state()

    def _refresh_empty_state(self) -> None:
        """No calls and no filter: the board gives way to how to place a test call."""
        empty = not self.state.calls and not self.board.filter_text
        self.query_one("#calls-area").set_class(empty, "empty")
        if empty:
            model = self.state.model
            self.query_one(EmptyBoard).update(
                empty_board_text(
                    self.state.node,
                    f"{model.model} {model.state}" + (f": {model.detail}" if model.detail else "") if model else None,
                    attached=self.link.kind != "embedded",
                    can_act=not self.read_only,
                )
            )

    def _render_dirty(self) -> None:
        """Redraw what changed since the last redraw, in one batch (no flicker)."""
        self._last_render = time.monotonic()
        s = self.state
        with self.batch_update():
            self.state_changed.publish(StateChanged(frozenset(s.dirty), frozenset(s.changed_calls | s.removed_calls)))
        s.changed_calls.clear()
        s.removed_calls.clear()
        s.dirty.clear()
        self._update_subtitle()

    def _render_all(self) -> None:
        """Theme changed or pause lifted: every panel redraws from the state."""
        self.state.dirty.update(("calls", "system", "feed"))
        self.state.changed_calls.update(self.state.calls)
        self._render_dirty()

    def _every_second(self) -> None:
        """Clocks that move by themselves: durations (unless a redraw just did them), staleness,
        the connection's state and the next attempt to reach a node that did not answer."""
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._retry_at = None
            self._open_link()
        self._show_health()
        if self.paused or not self.board.is_attached:
            return
        with self.batch_update():
            self.state_changed.publish(StateChanged(frozenset({CLOCK})))

    def _health(self) -> str | None:
        """Why the figures on screen may be old: disconnected, or not connected yet."""
        if self._retry_at is not None:
            return f"not connected, retrying in {max(0.0, self._retry_at - time.monotonic()):.0f} s"
        return self.link.health()

    def _show_health(self) -> None:
        """Grey the figures out while they may be stale and say why in the header, at once."""
        health = self._health()
        for panel in (self.board, self.system_panel):
            panel.set_class(health is not None, "disconnected")
        if health is not None or "disconnected" in self.sub_title or "not connected" in self.sub_title:
            self._update_subtitle()

    def _update_subtitle(self) -> None:
        model = self.state.model
        health = self._health()
        if health is not None:
            self.sub_title = f"{self.link.kind}: {self.link.target} · {health} · figures are stale"
            return
        if self._failed:
            return  # "not running" stays until the operator chooses retry
        if not self.link_open:  # until the runtime answers: never a made-up "0 live"
            waiting = "starting" if self.link.kind == "embedded" else "connecting"
            self.sub_title = f"{self.link.kind}: {self.link.target} · {waiting}…"
            return
        parts = [f"{self.link.kind}: {self.link.target}", f"{len(self.state.calls)} live"]
        if model is not None:
            parts.append(f"model {model.model} {model.state}")
        if self.read_only:
            parts.append("read-only")
        if self.paused:
            parts.append("PAUSED")
        self.sub_title = " · ".join(parts)

    @on(LogsArrived)
    def _logs_arrived(self) -> None:
        if isinstance(self.screen, LogsScreen):
            self.screen.refresh_logs()

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        """One place for worker failures: a toast naming what failed, the app carries on."""
        if event.state == WorkerState.ERROR:
            log.error("worker %s failed: %s", event.worker.name, event.worker.error)
            self.notify(
                f"{event.worker.description or event.worker.name}: {event.worker.error}",
                title="Failed",
                severity="error",
                markup=False,
            )  # error text is not markup

    # ---------------------------------------------------------------------- bindings
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Judge by the screen under any dialog or the palette: a palette entry runs from there.
        base = next((s for s in reversed(self.screen_stack) if not isinstance(s, ModalScreen)), self.screen)
        return self._allowed(action, base)

    def _allowed(self, action: str, screen: Screen) -> bool:
        """Whether ``action`` is offered on ``screen`` (footer, help, palette and the key itself)."""
        if action in CALL_ACTIONS and not (self.link_open and self._shows_calls(screen)):
            return False  # no call to act on here: the Users, Logs, records screens, a failed start
        if action in DASHBOARD_ACTIONS and not self._shows_calls(screen):
            return False  # on Help, Users, Logs and the records screens: their own keys, then escape
        if action == "focus_nodes" and self.nodes_panel is None:
            return False
        return not (self.read_only and action in ACTING)  # hidden, and the key only says why

    def _shows_calls(self, screen: Screen) -> bool:
        return isinstance(screen, CallDetailScreen) or screen is self.screen_stack[0]

    def key_rows(self) -> list[tuple[str, str, str]]:
        """(keys, description, tooltip) for every binding this session may use: the help table."""
        rows = []
        for binding in self.BINDINGS:
            assert isinstance(binding, Binding)
            if self._allowed(binding.action, self.screen_stack[0]):
                keys = ", ".join(self.get_key_display(Binding(k, binding.action)) for k in binding.key.split(","))
                rows.append((keys, binding.description, binding.tooltip))
        rows.append(("ctrl+p", "Palette", "Every action, theme change and call by name"))
        rows.append(("enter", "Detail", "Open the selected call's detail (on Events: the whole event)"))
        rows.append(("j, k, g, G", "Move", "Down, up, first row, last row (arrows, home and end work too)"))
        return rows

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every action in the palette, named "noun: verb"; per-call actions for each live call."""
        yield from super().get_system_commands(screen)
        for binding in self.BINDINGS:
            assert isinstance(binding, Binding)
            if binding.action in ("quit", "help") or not self._allowed(binding.action, screen):
                continue
            group = (binding.id or "app").split(".")[0]
            if group == "call":
                continue
            yield SystemCommand(
                f"{group}: {binding.description.lower()}", binding.tooltip, partial(self.run_action, binding.action)
            )
        for call_id in list(self.state.calls)[:50]:
            yield SystemCommand(
                f"call {call_id}: open detail", "Latency, levels, transcript", partial(self._open_detail, call_id)
            )
            for binding in self.BINDINGS:
                assert isinstance(binding, Binding)
                if binding.action in CALL_ACTIONS - {"local_call"} and self._allowed(binding.action, screen):
                    yield SystemCommand(
                        f"call {call_id}: {binding.description.lower()}",
                        binding.tooltip,
                        partial(self._act_on, call_id, binding.action),
                    )
        if self._allowed("local_call", screen):
            yield SystemCommand(
                "call: start a local voice conversation",
                "Microphone and speakers of this machine",
                partial(self.run_action, "local_call"),
            )

    async def _act_on(self, call_id: str, action: str) -> None:
        self._select(call_id)
        await self.run_action(action)

    def _select(self, call_id: str) -> None:
        self.board.select_call(call_id)

    # ---------------------------------------------------------------------- actions
    def selected_call(self) -> str | None:
        if isinstance(self.screen, CallDetailScreen):
            return self.screen.call_id
        return self.board.selected_call

    def _need_call(self) -> str | None:
        call_id = self.selected_call()
        if call_id is None:
            self.notify("no call selected", severity="warning", timeout=3)
        return call_id

    def _debounced(self, action: str) -> bool:
        now = time.monotonic()
        last = self._last_press.get(action, 0.0)
        self._last_press[action] = now
        return now - last < DEBOUNCE_S

    def _send(self, command: ev.Command, done: str, after: Callable[[], object] | None = None) -> None:
        self.run_worker(
            self._execute(command, done, after),
            group="command",
            exit_on_error=False,
            description=COMMAND_WORDS.get(type(command), "command"),
        )

    async def _execute(self, command: ev.Command, done: str, after: Callable[[], object] | None) -> None:
        try:
            answer = await self.link.execute(command)
        except LinkError as exc:
            words = COMMAND_WORDS.get(type(command), "command")
            self.notify(str(exc), title=f"{words.capitalize()} refused", severity="error", timeout=8, markup=False)
            return
        if after is not None:
            after()
        self.notify(done, timeout=3)
        if answer.get("audio"):
            self.notify(str(answer["audio"]), title="Audio", severity="warning", timeout=8, markup=False)

    def action_take_over(self) -> None:
        if (call_id := self._need_call()) and not self._debounced("take_over"):
            self._send(ev.TakeOver(call_id), f"you have {call_id}: speak now")

    def action_hand_back(self) -> None:
        if call_id := self._need_call():
            self._send(ev.HandBack(call_id), f"{call_id} is back with the AI")

    def action_listen(self) -> None:
        if not (call_id := self._need_call()):
            return
        if call_id in self.listening:
            self._send(ev.Unlisten(call_id), f"stopped listening to {call_id}", lambda: self._listening(call_id, False))
        else:
            self._send(ev.Listen(call_id), f"listening to {call_id}", lambda: self._listening(call_id, True))

    def _listening(self, call_id: str, on: bool) -> None:
        (self.listening.add if on else self.listening.discard)(call_id)
        self.board.mark_listening(self.listening)

    def action_whisper(self) -> None:
        if not (call_id := self._need_call()):
            return

        def send(text: str | None) -> None:
            if text:
                self._send(ev.Whisper(call_id, text), f"whispered to the AI on {call_id}")

        self.push_screen(WhisperScreen(call_id), send)

    def action_mute(self) -> None:
        if not (call_id := self._need_call()):
            return
        call = self.state.calls.get(call_id)
        if call is not None and call.mode == "muted":
            self._send(ev.Unmute(call_id), f"AI unmuted on {call_id}")
        else:
            self._send(ev.Mute(call_id), f"AI muted on {call_id}")

    def action_hang_up(self) -> None:
        if not (call_id := self._need_call()) or self._debounced("hang_up"):
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._send(ev.HangUp(call_id), f"hung up {call_id}")

        call = self.state.calls.get(call_id)
        question = f"Hang up call {call_id}?"
        if call is not None and call.operator and call.operator != self.link.actor:
            # Another operator is talking to this caller: say who, and they get a notice if it happens.
            question = f"{call.operator} holds call {call_id} and is talking to the caller.\n\nHang it up anyway?"
        self.push_screen(ConfirmScreen(question), answer)

    def action_transfer(self) -> None:
        if not (call_id := self._need_call()) or self._debounced("transfer"):
            return

        def answer(number: str | None) -> None:
            if number:
                self._send(ev.Transfer(call_id, to=number), f"transferring {call_id} to {number}")

        self.push_screen(TransferScreen(f"call {call_id}", self.transfer_number), answer)

    def action_local_call(self) -> None:
        if not self._debounced("local_call"):
            self._send(ev.StartLocalCall(), "local conversation started: speak to the AI")

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self._drain()
            self._render_all()
        self._update_subtitle()

    def action_reveal(self) -> None:
        board = self.board
        board.set_reveal(not board.reveal)

    def action_sort(self) -> None:
        self.notify(f"calls sorted by {self.board.cycle_sort()}", timeout=2)

    def action_reverse_sort(self) -> None:
        self.notify(f"calls sorted by {self.board.reverse_sort()}", timeout=2)

    def action_filter(self) -> None:
        if self.screen is not self.screen_stack[0]:
            return  # the filters belong to the dashboard; another screen must not open them unseen
        target = "events-filter" if self.feed_panel.has_focus else "calls-filter"
        box = self.query_one(f"#{target}", Input)
        box.add_class("shown")
        box.focus()

    def action_focus_calls(self) -> None:
        self.board.focus()

    def action_focus_events(self) -> None:
        self.feed_panel.focus()

    def action_focus_nodes(self) -> None:
        if self.nodes_panel is not None:
            self.nodes_panel.focus()

    def action_users(self) -> None:
        self.push_screen(UsersScreen(self.link))

    def action_history(self) -> None:
        self.push_screen(HistoryScreen(self.link, reveal=self.board.reveal))

    def action_inbox(self) -> None:
        self.push_screen(InboxScreen(self.link, reveal=self.board.reveal))

    def action_audit(self) -> None:
        self.push_screen(AuditScreen(self.link, reveal=self.board.reveal))

    def action_logs(self) -> None:
        self.push_screen(LogsScreen(self.log_mirror))

    def action_help(self) -> None:
        from xswarm_tui.screens.help import HelpScreen  # Markdown is heavy; first paint does not need it

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.key_rows()))

    def _open_detail(self, call_id: str) -> None:
        self.push_screen(CallDetailScreen(call_id, self.state, self.clock, self.board.reveal, self.state_changed))

    @on(DataTable.RowSelected, "#calls")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self._open_detail(str(event.row_key.value))

    @on(DataTable.RowSelected, "#events")
    def _event_selected(self, event: DataTable.RowSelected) -> None:
        item = self.feed_panel.item(str(event.row_key.value))
        if item is not None:
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item.at))
            self.push_screen(RecordScreen(f"Event · {item.category}", f"{at}  {item.category}\n\n{item.text}"))

    @on(Input.Changed, ".filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        panel = self.board if event.input.id == "calls-filter" else self.feed_panel
        panel.set_filter(event.value)

    @on(Input.Submitted, ".filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        (self.board if event.input.id == "calls-filter" else self.feed_panel).focus()
        if not event.value:
            event.input.remove_class("shown")

    def on_key(self, event: Key) -> None:
        """Escape clears a filter (in its box, or on its panel once applied); an acting key in
        read-only mode says why nothing happens instead of doing nothing silently."""
        focused = self.focused
        if event.key == "escape" and isinstance(focused, Input) and focused.has_class("filter"):
            self._clear_filter(focused)
            (self.board if focused.id == "calls-filter" else self.feed_panel).focus()
        elif event.key == "escape" and focused in (self.board, self.feed_panel) and focused.filter_text:
            self._clear_filter(self.query_one("#calls-filter" if focused is self.board else "#events-filter", Input))
        elif self.read_only and event.key in ACTING_KEYS and self.link_open and self._shows_calls(self.screen):
            why = "--read-only" if self._read_only_flag else "a monitor token"
            self.notify(
                f"{ACTING_KEYS[event.key]} is not available: this console is read-only ({why})",
                severity="warning",
                timeout=4,
            )

    def _clear_filter(self, box: Input) -> None:
        box.value = ""  # Input.Changed clears the panel's filter
        box.remove_class("shown")
        (self.board if box.id == "calls-filter" else self.feed_panel).set_filter("")

    async def action_quit(self) -> None:
        """Quit at once with no live calls; otherwise ask, naming how many calls are live."""
        live = len(self.state.calls)
        if not live or not self.link_open:
            self.exit()
            return
        if isinstance(self.screen, ConfirmScreen):
            return  # a second `q` while the question is up is not an answer
        calls = f"{live} live call{'s' if live != 1 else ''}"
        if self.link.kind == "embedded":
            question = f"{calls} will be ended: quitting stops this node and cuts the callers off.\n\nQuit anyway?"
        else:
            question = f"{calls} go on at {self.link.target} (calls you hold go back to the AI).\n\nQuit this console?"

        def answer(yes: bool | None) -> None:
            if yes:
                self.exit()

        self.push_screen(ConfirmScreen(question), answer)
