"""Dashboard benchmark: 50 echo calls, then 5 terminal consoles, then 5 browser dashboards.

The node is a real `xswarm serve --model echo` (its CPU measured with psutil), the calls come
from the bridge's Twilio simulator in a load process of their own, and the dashboards are pages
in the system's headless Chromium (Playwright), each logged in and listening to one call, as a
supervisor watching a call would. Three windows of equal length, figures from each:

- calls only: the node's CPU and late frames (the baseline);
- 5 consoles (the supervisor client library, as `xswarm attach` uses it), each listening to a
  call: the node's CPU and late frames;
- 5 dashboards, each listening to a call: the node's CPU (goal: at most 1.5x the consoles'),
  late frames (goal: none beyond the baseline), the browser's CPU (every Chromium process), the
  page's update rate (batches of DOM changes per second in the calls table, per page), and the
  listen delay: a 20 ms burst sent by a probe caller -> its first loud sample leaving the page's
  audio graph (goal p50 <= 250 ms), with the node -> graph part alone.

``--pin`` puts the node on CPU 0 and the load calls and Chromium on the other CPUs, as when
browsers run on the supervisors' machines; it needs enough CPUs for the load calls and the
browser (on a 2-core box they starve each other on the one CPU left, and the figures say so).

    .venv/bin/python benchmarks/web.py [--calls 50 --dashboards 5 --seconds 8] [--pin]

Prints ONE JSON object on stdout (progress on stderr); ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from browser_support import chromium_path, launch_args  # noqa: E402

from benchmarks.node_load import pin  # noqa: E402
from benchmarks.report import emit, machine  # noqa: E402
from benchmarks.supervisor import (  # noqa: E402
    MONITOR,
    SILENCE,
    TONE,
    CpuMeter,
    Node,
    Probe,
    Watcher,
    http_get,
    log,
    metric,
    stats_ms,
)
from engine.events import Listen  # noqa: E402
from engine.supervisor.client import SupervisorClient  # noqa: E402

PROBE = "CAPROBEWEBLISTEN"
COUNT_UPDATES = """
window.__played = [];
document.addEventListener("xswarm-audio", (e) => window.__played.push(e.detail));
window.__updates = 0;
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(() => window.__updates++).observe(document.querySelector("#calls tbody"),
    {childList: true, subtree: true, characterData: true, attributes: true});
});
"""


class BrowserCpu:
    """CPU of every Chromium process under this one (Playwright's driver starts them)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process(os.getpid())

    def _total(self) -> float:
        total = 0.0
        for proc in self.me.children(recursive=True):
            try:
                if "chrom" in proc.name().lower():
                    t = proc.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
            except Exception:  # a renderer that ended meanwhile
                continue
        return total

    def start(self) -> None:
        self.cpu0, self.wall0 = self._total(), time.monotonic()

    def stop(self) -> float:
        return round(100 * (self._total() - self.cpu0) / (time.monotonic() - self.wall0), 1)


def late_frames(port: int) -> float:
    return metric(http_get(port, "/metrics"), "xswarm_late_frames_total")


async def window(seconds: float, node: Node, cpu: CpuMeter) -> dict[str, float]:
    """Node CPU and late frames over one measuring window, and how many calls were still live
    at its end (a starved load process loses calls, which makes a window look cheap)."""
    late0 = await asyncio.to_thread(late_frames, node.sup_port)
    cpu.start()
    await asyncio.sleep(seconds)
    node_cpu = cpu.stop()
    health = json.loads(await asyncio.to_thread(http_get, node.sup_port, "/health"))
    return {
        "node_cpu_percent_of_one_core": node_cpu,
        "late_frames": await asyncio.to_thread(late_frames, node.sup_port) - late0,
        "calls_live_at_end": health["calls"],
    }


async def open_dashboard(browser: Any, node: Node, call_id: str) -> Any:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    await page.add_init_script(COUNT_UPDATES)
    await page.goto(f"http://127.0.0.1:{node.sup_port}/")
    await page.fill("input[name=token]", MONITOR)
    await page.click("#login button[type=submit]")
    row = page.locator(f"tr[data-call-sid='{call_id}']")
    await row.click(timeout=30000)
    await page.click("[data-action=listen]")
    return page


def listen_delays(played: list[dict[str, Any]], sent: dict[int, float], bursts: set[int]) -> tuple[list, list]:
    """(burst sent -> its first loud sample played, node tap -> played) for the probe's bursts."""
    onsets = sorted(
        p["playedAt"] + p["onset"]
        for p in played
        if p["callId"] == PROBE and p["direction"] == "caller" and p["onset"] is not None
    )
    behind_caller = []
    for k in sorted(bursts):
        at = sent.get(k)
        if at is None:
            continue
        later = [t for t in onsets if at <= t < at + 1.0]
        if later:
            behind_caller.append(later[0] - at)
    node_to_graph = [p["playedAt"] - p["capturedAt"] for p in played if p["callId"] == PROBE]
    return behind_caller, node_to_graph


async def measure(args: argparse.Namespace, node: Node) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    executable = chromium_path()
    if executable is None:
        raise SystemExit("no Chromium: install Debian's chromium (bash .ci/setup --dev) or set XSWARM_CHROMIUM")
    cpu = CpuMeter(node.server.pid)
    total = 3 * args.seconds + 120
    every = 20  # a 20 ms burst every 400 ms
    bursts = set(range(50, int(total / 0.02), every))
    probe = Probe(
        f"ws://127.0.0.1:{node.bridge_port}/twilio",
        PROBE,
        b"".join(TONE if k in bursts else SILENCE for k in range(int(total / 0.02))),
    )
    while json.loads(await asyncio.to_thread(http_get, node.sup_port, "/health"))["calls"] < args.calls:
        await asyncio.sleep(0.1)
    log(f"{args.calls} calls live")
    await asyncio.sleep(1.0)
    listened = [PROBE] + [f"CALOAD{i:04d}" for i in range(args.dashboards - 1)]

    calls_only = await window(args.seconds, node, cpu)
    log(f"calls only: {calls_only}")

    url = f"ws://127.0.0.1:{node.sup_port}/"
    consoles = [SupervisorClient(url, MONITOR, name=f"console{i}") for i in range(args.dashboards)]
    for c in consoles:
        await c.start()
    watchers = [Watcher(c) for c in consoles]
    for c, call_id in zip(consoles, listened, strict=True):
        await c.command(Listen(call_id))
    await asyncio.sleep(1.0)
    with_consoles = await window(args.seconds, node, cpu)
    for w in watchers:
        w.stop()
    for c in consoles:
        await c.close()
    log(f"5 consoles: {with_consoles}")
    await asyncio.sleep(1.0)

    browser_cpu = BrowserCpu()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=launch_args(None))
        try:
            pages = [await open_dashboard(browser, node, call_id) for call_id in listened]
            await asyncio.sleep(2.0)
            for page in pages:
                await page.evaluate("() => { window.__played = []; window.__updates = 0; }")
            sent_from = time.time()
            browser_cpu.start()
            t0 = time.monotonic()
            with_dashboards = await window(args.seconds, node, cpu)
            elapsed = time.monotonic() - t0
            with_dashboards["browser_cpu_percent_of_one_core"] = browser_cpu.stop()
            updates = [await page.evaluate("() => window.__updates") / elapsed for page in pages]
            played = await pages[0].evaluate("() => window.__played")
        finally:
            await browser.close()
    log(f"5 dashboards: {with_dashboards}")
    probe.task.cancel()
    sent = {k: t for k, t in probe.sent.items() if t >= sent_from}
    behind_caller, node_to_graph = listen_delays(played, sent, bursts)
    ratio = with_dashboards["node_cpu_percent_of_one_core"] / max(0.1, with_consoles["node_cpu_percent_of_one_core"])
    late_extra = with_dashboards["late_frames"] - calls_only["late_frames"]
    delay = stats_ms(behind_caller)
    return {
        "benchmark": "web",
        "calls": args.calls,
        "dashboards": args.dashboards,
        "model": "echo",
        "window_s": args.seconds,
        "machine": machine(),
        "cpu_pinning": args.pinned,
        "calls_only": calls_only,
        "with_consoles": with_consoles,
        "with_dashboards": with_dashboards,
        "page_updates_per_s": {
            "per_page": [round(u, 2) for u in updates],
            "mean": round(float(np.mean(updates)), 2),
        },
        "listen_delay_ms": {
            "caller_to_audio_graph": delay,
            "node_tap_to_audio_graph": stats_ms(node_to_graph),
            "goal_p50_ms": 250,
            "met": bool(delay.get("n") and delay["p50"] <= 250),
        },
        "node_cpu_dashboards_over_consoles": {"ratio": round(ratio, 2), "goal": 1.5, "met": ratio <= 1.5},
        "late_frames_beyond_calls_only": {"frames": late_extra, "goal": 0, "met": late_extra <= 0},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50, help="live calls in all, one of them the listen probe")
    ap.add_argument("--dashboards", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each measuring window")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--pin", action="store_true", help="the node on CPU 0, the load and Chromium on the others")
    args = ap.parse_args(argv)
    if args.calls < args.dashboards + 1:
        ap.error("--calls must be at least --dashboards + 1")
    node = Node.start(slots=args.calls + 4)
    load = None
    try:
        args.pinned = pin([node.server.pid]) if args.pin else None
        log(f"node ready (pid {node.server.pid}); starting {args.calls - 1} load calls")
        load = node.start_load(args.calls - 1, 3 * args.seconds + 150)
        report = asyncio.run(measure(args, node))
    finally:
        node.stop(load)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
