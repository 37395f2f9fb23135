"""GPU and system panel: NVML figures, CPU/RAM, model state, batch occupancy, tick budget,
missed ticks, and whether admission is paused because the model has no headroom."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.signal import Signal
from textual.widgets import Sparkline, Static

from engine.tick import FRAME_S
from xswarm_tui.state import CLOCK, ConsoleState, StateChanged
from xswarm_tui.widgets.format import bar, gib

STALE_AFTER = 3.0
"""A panel greys out when its newest sample is older than this many sampling intervals."""


class SystemPanel(Vertical):
    """Shows only measured values; "n/a" or a plain sentence where a source is missing."""

    def __init__(
        self,
        state: ConsoleState,
        clock: Callable[[], float],
        interval_s: float,
        changes: Signal[StateChanged],
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.state = state
        self.clock = clock
        self.interval_s = interval_s
        self._changes = changes
        self.border_title = "[u]G[/u]PU & system"

    def on_mount(self) -> None:
        self._changes.subscribe(self, self._state_changed, immediate=True)

    def _state_changed(self, change: StateChanged) -> None:
        if change.parts & {"system", "model"}:
            self.refresh_panel()
        elif CLOCK in change.parts:
            self.check_stale()

    def compose(self) -> ComposeResult:
        yield Static(id="system-text")
        yield Static("tick step time p50, last 30 s", classes="caption")
        yield Sparkline([], id="tick-history")

    def refresh_panel(self) -> None:
        self.query_one("#system-text", Static).update(self._render_text())
        history = list(self.state.tick_history)
        self.query_one("#tick-history", Sparkline).data = history
        self.check_stale()

    def check_stale(self) -> None:
        sample = self.state.system
        stale = sample is not None and self.clock() - sample.at > STALE_AFTER * self.interval_s
        self.set_class(stale, "stale")

    def _render_text(self) -> Text:
        c = self.app.theme_variables
        out = Text()
        sample = self.state.system
        if sample is None:
            out.append("waiting for the first system sample…\n", style="dim")
        else:
            if not sample.gpus:
                out.append("No GPU", style="bold")
                out.append(f": {sample.gpu_reason or 'none found'}\n")
            for i, gpu in enumerate(sample.gpus):
                util = gpu.get("util_percent")
                out.append(f"GPU{i} ", style="bold")
                out.append(f"{str(gpu.get('name', '?'))[:28]}\n")
                out.append("  util ")
                if util is None:
                    out.append("n/a\n")
                else:
                    out.append(bar(util / 100, 12), style=c.get("gpu", ""))
                    out.append(f" {util:3.0f}%\n")
                used, total = gpu.get("mem_used"), gpu.get("mem_total")
                vram = f"{gib(used)} / {gib(total)} GiB" if used is not None and total else "n/a"
                temp = f"{gpu['temp_c']:.0f} °C" if gpu.get("temp_c") is not None else "n/a"
                power = f"{gpu['power_w']:.0f} W" if gpu.get("power_w") is not None else "n/a"
                out.append(f"  VRAM {vram}  {temp}  {power}\n")
            out.append("CPU  ", style="bold")
            out.append(bar(sample.cpu_percent / 100, 12), style=c.get("gpu", ""))
            out.append(f" {sample.cpu_percent:3.0f}%\n")
            out.append("RAM  ", style="bold")
            out.append(f"{gib(sample.ram_used_bytes)} / {gib(sample.ram_total_bytes)} GiB\n")
        model = self.state.model
        out.append("Model ", style="bold")
        if model is None:
            out.append("starting…\n", style="dim")
        else:
            style = {"ready": "latency-good", "failed": "latency-bad", "fallback": "latency-warn"}.get(model.state, "")
            out.append(f"{model.model} ")
            out.append(model.state, style=c.get(style, ""))
            if model.state == "loading" and model.progress is not None:
                out.append(f" {bar(model.progress, 10)} {model.progress * 100:.0f}%")
            out.append("\n")
            if model.detail:
                out.append(f"  {model.detail[:40]}\n", style="dim")
        tick = self.state.tick
        if tick is None:
            out.append("Batch n/a  Tick n/a\n", style="dim")
        else:
            # The budget is the whole tick's work (gather, model step, hand-off): all of it must
            # fit in 80 ms. Older nodes only report the model step; fall back to that.
            work = tick.tick_work_ms_p50 if tick.tick_work_ms_p50 is not None else tick.step_ms_p50
            budget = work / (FRAME_S * 1000)
            grade = "latency-good" if budget < 0.6 else "latency-warn" if budget < 0.9 else "latency-bad"
            # The scheduler reports only while it ticks, so its last sample would say "2 active"
            # forever after the last call ended: no live calls means an empty batch.
            active = tick.active if self.state.calls else 0
            out.append("Batch ", style="bold")
            out.append(f"{active} / {tick.slots} slots\n")
            out.append("Tick  ", style="bold")
            out.append(bar(budget, 12), style=c.get(grade, ""))
            out.append(f" {budget * 100:3.0f}% of 80 ms\n")
            out.append(f"  step p50 {tick.step_ms_p50:.1f} ms  max {tick.step_ms_max:.1f} ms  ")
            out.append(f"missed {tick.missed_ticks}", style=c.get("latency-bad", "") if tick.missed_ticks else "")
        paused = self.state.admission_paused(self.clock())
        if paused is not None:
            out.append("\nAdmission paused: model has no headroom", style=f"bold {c.get('latency-bad', '')}".strip())
            detail = paused.removeprefix("model has no headroom").lstrip(": ")
            if detail:
                out.append(f"\n  {detail[:60]}", style="dim")
        return out
