"""The console's cost: time to first paint, UI CPU idle and with 50 live calls, late frames.

Prints one JSON object. Each phase runs in a fresh interpreter (so imports and caches are
honest) with its own XSWARM_HOME:

* ``first_paint``: the real command, `xswarm --model echo`, on a pseudo-terminal: the app's
  log line gives the time from the CLI loading the console module to Textual's first refresh
  of the dashboard, and whether torch was imported by then (it must not be);
  ``spawn_to_first_paint_ms`` is the wall time from spawning the process to that line.
* ``idle``: CPU time of the UI thread (Textual's loop; ``time.thread_time``) per wall second,
  as % of one core, with the embedded echo runtime and no calls.
* ``calls_50``: the same with 50 real phone calls: the ``xswarm call`` simulator (in another
  process) streams Twilio Media Streams into the runtime's real bridge, so the runtime
  publishes its real event stream (latency samples, transcript, tick and system samples).
* ``late_frames``: the bridge's late frames (inbound audio that missed its tick) and the
  scheduler's missed ticks over the 50-call window with the UI running, against the same load
  with no UI (``baseline``): the difference of the medians over ``--repeat`` interleaved runs
  is what the UI caused (every run is listed too: on a shared machine they vary).

The CPU phases run the app headless (Textual's headless driver renders every frame but writes
it nowhere), so terminal I/O is not in those figures. Targets: first paint < 1 s; idle < 2 % of a core;
50 calls < 25 %; zero late frames caused by the UI.

    .venv/bin/python benchmarks/tui.py [--seconds 10] [--calls 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARMUP_S = 2.0


AUTH_TOKEN = "bench-twilio-auth-token"
TOKEN_SECRET = "bench-call-token-secret"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runtime() -> object:
    from engine.config import load_settings
    from engine.runtime import Runtime

    return Runtime(load_settings(), model_spec="echo", bridge_port=_free_port(), supervisor_port=0, webhooks_port=0)


def _place_calls(runtime: object, n: int, seconds: float) -> subprocess.Popen:
    """n Twilio-style calls into the runtime's real bridge, from another process (the simulator
    must not share this process's GIL, or it would be measured as the UI's or the bridge's cost)."""
    caller = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            "twilio",
            "--port",
            str(runtime.bridge_port),  # type: ignore[attr-defined]
            "--calls",
            str(n),
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while runtime.calls.used < n:  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            caller.kill()
            raise SystemExit(f"only {runtime.calls.used} of {n} calls were admitted")  # type: ignore[attr-defined]
        time.sleep(0.05)
    return caller


def child_twilio(port: int, calls: int, seconds: float) -> dict:
    import asyncio

    import numpy as np

    from engine.audio import mulaw
    from engine.bridge import simulator
    from engine.telephony.calltoken import Claims, mint

    t = np.arange(int(8000 * seconds)) / 8000
    audio = mulaw.encode((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)).tobytes()

    async def one(k: int) -> None:
        sid = simulator.new_sid("CA")
        target = simulator.StreamTarget(
            f"ws://127.0.0.1:{port}/twilio",
            {"token": mint(TOKEN_SECRET, sid, claims=Claims(f"u-{k}", f"+1415555{k:04d}", "xswarm"))},
        )
        await simulator.stream_call(target, audio, auth_token=AUTH_TOKEN, call_sid=sid)

    async def all_calls() -> None:
        await asyncio.gather(*(one(k) for k in range(calls)), return_exceptions=True)

    asyncio.run(all_calls())
    return {}


def _wait_ready(runtime: object) -> None:
    deadline = time.monotonic() + 30
    while runtime.model is None:  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise SystemExit("model did not load")
        time.sleep(0.02)


def _scheduler_counts(runtime: object) -> tuple[int, int]:
    d = runtime.scheduler.describe()  # type: ignore[attr-defined]
    return int(d["late_frames"]), int(d["missed_ticks"])


# ----------------------------------------------------------------------------- children


def first_paint_on_a_terminal() -> dict:
    """Run `xswarm --model echo` on a pseudo-terminal until its log says it painted, then quit."""
    import pty
    import re

    master, slave = pty.openpty()
    with tempfile.TemporaryDirectory(prefix="xswarm-bench-tui-") as home:
        env = dict(
            os.environ,
            XSWARM_HOME=home,
            TERM="xterm-256color",
            XSWARM_SERVER__BRIDGE_PORT="0",
            XSWARM_SERVER__SUPERVISOR_PORT="0",
            COLUMNS="120",
            LINES="40",
        )
        log = Path(home) / "state" / "logs" / "xswarm.log"
        spawned = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "xswarm_tui.cli", "--model", "echo"],
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        match = None
        try:
            while match is None and time.perf_counter() - spawned < 60:
                _drain(master)
                text = log.read_text(encoding="utf-8") if log.exists() else ""
                match = re.search(r"first paint (\d+) ms after start \(torch imported: (\w+)\)", text)
                time.sleep(0.005)
            wall = time.perf_counter() - spawned
            time.sleep(1.0)  # let the runtime come up, so quitting takes the normal path
            os.write(master, b"q")
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                _drain(master)
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
    if match is None:
        raise SystemExit("the console never logged its first paint")
    return {
        "first_paint_ms": float(match.group(1)),
        "spawn_to_first_paint_ms": round(wall * 1000, 1),
        "torch_imported_at_first_paint": match.group(2) == "True",
        "exit_code": proc.returncode,
    }


def _drain(fd: int) -> None:
    """Read what the app drew so the pseudo-terminal never fills up and blocks it."""
    import select

    while select.select([fd], [], [], 0)[0]:
        try:
            if not os.read(fd, 65536):
                return
        except OSError:
            return


def child_ui(calls: int, seconds: float) -> dict:
    from xswarm_tui.app import XswarmApp
    from xswarm_tui.link import EmbeddedLink

    link = EmbeddedLink(_runtime, audio=lambda: "benchmark: no audio")
    result: dict = {}

    class Measured(XswarmApp):
        def on_mount(self) -> None:
            super().on_mount()
            self.set_timer(0.1, self._wait_runtime)

        def _wait_runtime(self) -> None:
            if link.runtime is None or link.runtime.model is None:
                self.set_timer(0.1, self._wait_runtime)
                return
            if calls:
                self._caller = _place_calls(link.runtime, calls, WARMUP_S + seconds + 5)
            self.set_timer(WARMUP_S, self._begin)

        def _begin(self) -> None:
            self._cpu0, self._wall0 = time.thread_time(), time.perf_counter()
            self._counts0 = _scheduler_counts(link.runtime)
            self._rows0 = len(self.board.rows)
            self.set_timer(seconds, self._end)

        def _end(self) -> None:
            cpu, wall = time.thread_time() - self._cpu0, time.perf_counter() - self._wall0
            late, missed = _scheduler_counts(link.runtime)
            result.update(
                ui_cpu_percent_of_core=round(100 * cpu / wall, 2),
                seconds=round(wall, 2),
                rows=len(self.board.rows),
                late_frames=late - self._counts0[0],
                missed_ticks=missed - self._counts0[1],
            )
            self.exit()

    app = Measured(link)
    app.run(headless=True, size=(120, 40))
    link.close()
    if getattr(app, "_caller", None) is not None:
        app._caller.wait(timeout=30)
    return result


def child_baseline(calls: int, seconds: float) -> dict:
    runtime = _runtime()
    runtime.start()  # type: ignore[attr-defined]
    try:
        _wait_ready(runtime)
        caller = _place_calls(runtime, calls, WARMUP_S + seconds + 5)
        time.sleep(WARMUP_S)
        late0, missed0 = _scheduler_counts(runtime)
        time.sleep(seconds)
        late, missed = _scheduler_counts(runtime)
    finally:
        runtime.stop()  # type: ignore[attr-defined]
    caller.wait(timeout=30)
    return {"late_frames": late - late0, "missed_ticks": missed - missed0, "seconds": seconds}


# ------------------------------------------------------------------------------- parent


def _run_child(args: list[str]) -> dict:
    env = dict(os.environ, TWILIO_AUTH_TOKEN=AUTH_TOKEN, XSWARM_CALL_TOKEN_SECRET=TOKEN_SECRET)
    with tempfile.TemporaryDirectory(prefix="xswarm-bench-tui-") as home:
        env["XSWARM_HOME"] = home
        out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"phase {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per phase")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the 50-call phases (medians are reported)")
    parser.add_argument("--child", choices=["idle", "calls", "baseline", "twilio"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = {
            "idle": lambda: child_ui(0, args.seconds),
            "calls": lambda: child_ui(args.calls, args.seconds),
            "baseline": lambda: child_baseline(args.calls, args.seconds),
            "twilio": lambda: child_twilio(args.port, args.calls, args.seconds),
        }[args.child]()
        print(json.dumps(result))
        return

    paint = first_paint_on_a_terminal()
    idle = _run_child(["--child", "idle", "--seconds", str(args.seconds)])
    busy_runs, base_runs = [], []
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour hits both sides alike
        busy_runs.append(_run_child(["--child", "calls", "--seconds", str(args.seconds), "--calls", str(args.calls)]))
        base_runs.append(
            _run_child(["--child", "baseline", "--seconds", str(args.seconds), "--calls", str(args.calls)])
        )
    import statistics

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    import psutil

    report = {
        "benchmark": "tui",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": psutil.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "first_paint_ms": paint["first_paint_ms"],
        "spawn_to_first_paint_ms": paint["spawn_to_first_paint_ms"],
        "console_exit_code": paint["exit_code"],
        "torch_imported_at_first_paint": paint["torch_imported_at_first_paint"],
        "idle_ui_cpu_percent_of_core": idle["ui_cpu_percent_of_core"],
        "calls": args.calls,
        "calls_ui_cpu_percent_of_core": median(busy_runs, "ui_cpu_percent_of_core"),
        "calls_rows_on_board": min(r["rows"] for r in busy_runs),
        "late_frames_with_ui": median(busy_runs, "late_frames"),
        "late_frames_without_ui": median(base_runs, "late_frames"),
        "late_frames_caused_by_ui": max(0, median(busy_runs, "late_frames") - median(base_runs, "late_frames")),
        "missed_ticks_with_ui": median(busy_runs, "missed_ticks"),
        "missed_ticks_without_ui": median(base_runs, "missed_ticks"),
        "missed_ticks_caused_by_ui": max(0, median(busy_runs, "missed_ticks") - median(base_runs, "missed_ticks")),
        "runs": {
            "with_ui": [
                {k: r[k] for k in ("ui_cpu_percent_of_core", "late_frames", "missed_ticks")} for r in busy_runs
            ],
            "without_ui": [{k: r[k] for k in ("late_frames", "missed_ticks")} for r in base_runs],
        },
        "frames_per_window": args.calls * round(args.seconds / 0.08),
        "window_s": args.seconds,
        "targets": {
            "first_paint_ms": 1000,
            "idle_ui_cpu_percent_of_core": 2,
            "calls_ui_cpu_percent_of_core": 25,
            "late_frames_caused_by_ui": 0,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
