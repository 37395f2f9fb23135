"""Voice bridge under load: N concurrent simulated Twilio calls against the echo model.

Client and server run in separate processes. The server is the real Runtime (bridge +
scheduler + echo model, database on), started once per N; the callers are load-generator
processes of up to 25 calls each, placing calls with ``engine.bridge.simulator`` (real-time
20 ms pacing, mark echoes), starts staggered by a step that is not a multiple of 20 ms so
callers' phases spread over the tick.
After every call is up, the server's figures are reset (MARK), a measurement window runs,
and the server reports (REPORT) from inside its own process:

- ``bal_ms``: bridge-added latency, 4th inbound ``media`` of a frame -> first outbound
  ``media`` of the step that consumed it (includes the wait for the 80 ms tick);
- ``tick_to_send_ms``: the part of BAL after the tick fired (step, DSP, send);
- late frames, missed ticks, step time;
- ``cpu_percent_per_call``: server process CPU time / wall time / N, in % of one core.

    .venv/bin/python benchmarks/bridge.py [--calls 1,10,50,100] [--window 10]

Prints one JSON object. Targets (issue 4, 2-core box): 100 calls with BAL p99 <= 20 ms, zero
late frames, <= 1 % of one core per call in the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine  # noqa: E402

TARGETS = {"calls": 100, "bal_p99_ms": 20.0, "late_frames": 0, "cpu_percent_per_call": 1.0}


# ------------------------------------------------------------------------------ server


def serve(port: int, slots: int, model: str) -> None:
    """The server process: a Runtime driven by MARK / REPORT / QUIT lines on stdin."""
    from engine.config import load_settings
    from engine.logging_setup import configure
    from engine.runtime import Runtime

    configure()
    settings = load_settings()
    settings.model.slots = slots
    runtime = Runtime(settings, model_spec=model, bridge_port=port, supervisor_port=0, webhooks_port=0)
    runtime.start()
    while runtime.model is None:
        time.sleep(0.01)
    print("READY", flush=True)
    marked = (time.monotonic(), time.process_time())
    for line in sys.stdin:
        command = line.strip()
        if command == "MARK":
            runtime.call_soon(_reset(runtime)).result()
            marked = (time.monotonic(), time.process_time())
        elif command == "REPORT":
            wall = time.monotonic() - marked[0]
            cpu = time.process_time() - marked[1]
            bridge = runtime.bridge.describe()
            sched = runtime.scheduler
            print(
                json.dumps(
                    {
                        "wall_s": round(wall, 3),
                        "cpu_s": round(cpu, 3),
                        "live_calls": len(runtime.calls),
                        "bal_ms": bridge["bal_ms"],
                        "tick_to_send_ms": bridge["tick_to_send_ms"],
                        "playout_lag_ms": bridge["playout_lag_ms"],
                        "refusals": bridge["refusals"],
                        "late_frames": sched.late_frames,
                        "missed_ticks": sched.missed_ticks,
                        "model_step_ms": sched.model_step_ms.summary(),
                        "tick_work_ms": sched.tick_work_ms.summary(),
                        "admission_ms": sched.admission_ms.summary(),
                    }
                ),
                flush=True,
            )
        elif command == "QUIT":
            break
    runtime.stop()


async def _reset(runtime: Any) -> None:
    from engine.telemetry.latency import Histogram

    bridge, sched = runtime.bridge, runtime.scheduler
    bridge.bal_ms, bridge.tick_to_send_ms, bridge.playout_lag_ms = Histogram(), Histogram(), Histogram()
    sched.model_step_ms, sched.tick_work_ms = Histogram(), Histogram()
    sched.late_frames = 0
    sched.missed_ticks = 0


# ------------------------------------------------------------------------------ client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, slots: int, model: str) -> None:
        self.port = free_port()
        self.home = tempfile.TemporaryDirectory(prefix="xswarm-bench-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XSWARM_", "TWILIO_"))}
        env["XSWARM_HOME"] = self.home.name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.port), "--slots", str(slots), "--model", model],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "READY":
            raise RuntimeError(f"server did not start: {line!r}")

    def command(self, text: str) -> dict[str, Any] | None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline()) if text == "REPORT" else None

    def close(self) -> None:
        try:
            self.command("QUIT")
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.home.cleanup()


def test_audio(seconds: float) -> bytes:
    from engine.audio.testsignal import speech_band_ulaw

    return speech_band_ulaw(seconds, seed=11)


CALLS_PER_CLIENT = 25
"""Simulated calls per load-generator process. One Python process driving 100 calls spends
~15 ms on the burst of 500 replies after every tick, which delays its own next chunks: that
is load-generator jitter, not the bridge's, so the callers are spread over processes."""


def client(port: int, first: int, count: int, stagger_s: float, seconds: float) -> None:
    """A load-generator process: calls ``first .. first+count-1``, one JSON report each on stdout."""
    from engine.bridge.simulator import StreamTarget, stream_call

    audio = test_audio(seconds)
    target = StreamTarget(f"ws://127.0.0.1:{port}/twilio")

    async def one(k: int) -> Any:
        await asyncio.sleep(k * stagger_s)
        return await stream_call(target, audio, tail_s=0.3)

    async def main() -> list[Any]:
        return await asyncio.gather(*(one(k) for k in range(first, first + count)), return_exceptions=True)

    gc.collect()
    gc.freeze()  # the load generator's collector must not stall its callers at once
    cpu, started = time.process_time(), time.monotonic()
    results = asyncio.run(main())
    share = (time.process_time() - cpu) / (time.monotonic() - started)
    print(
        json.dumps(
            {
                "cpu_share": share,
                "reports": [r.to_json() if not isinstance(r, BaseException) else {"error": repr(r)} for r in results],
            }
        ),
        flush=True,
    )


def run(
    calls: int, window_s: float, stagger_s: float, model: str, per_client: int = CALLS_PER_CLIENT
) -> dict[str, Any]:
    server = Server(slots=max(calls, 1), model=model)
    ramp = stagger_s * (calls - 1)
    seconds = ramp + window_s + 3.0
    procs = []
    try:
        for first in range(0, calls, per_client):
            count = min(per_client, calls - first)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--client",
                        str(server.port),
                        "--first",
                        str(first),
                        "--count",
                        str(count),
                        "--stagger",
                        str(stagger_s),
                        "--seconds",
                        str(seconds),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
            )
        time.sleep(ramp + 1.5)
        server.command("MARK")
        time.sleep(window_s)
        report = server.command("REPORT") or {}
        outputs = [json.loads(proc.communicate(timeout=seconds + 60)[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        server.close()
    reports = [r for out in outputs for r in out["reports"]]
    failures = [r["error"] for r in reports if "error" in r]
    reports = [r for r in reports if "error" not in r]
    delays = sorted(r["echo_delay_ms"] for r in reports if r["echo_delay_ms"] is not None)
    pacing = [r["send_late_ms"] for r in reports if r["send_late_ms"].get("count")]
    wall, cpu = report.get("wall_s") or 1.0, report.get("cpu_s") or 0.0
    return {
        "calls": calls,
        "window_s": wall,
        "bal_ms": report.get("bal_ms"),
        "tick_to_send_ms": report.get("tick_to_send_ms"),
        "late_frames": report.get("late_frames"),
        "missed_ticks": report.get("missed_ticks"),
        "model_step_ms": report.get("model_step_ms"),
        "tick_work_ms": report.get("tick_work_ms"),
        "playout_lag_ms": report.get("playout_lag_ms"),
        "live_calls_in_window": report.get("live_calls"),
        "server_cpu_percent_per_call": round(100 * cpu / wall / calls, 3),
        "server_cpu_percent_total": round(100 * cpu / wall, 2),
        "client_processes": len(outputs),
        "client_cpu_percent_total": round(100 * sum(out["cpu_share"] for out in outputs), 2),
        "client_echo_delay_ms": {"p50": delays[len(delays) // 2], "max": delays[-1]} if delays else None,
        # the simulated callers' own pacing: chunks that left late look like network jitter to the
        # bridge (a late frame here is the load generator's, not the bridge's, when these are large)
        "client_send_late_ms": {
            "worst_call_p99": max(p["p99"] for p in pacing),
            "max": max(p["max"] for p in pacing),
            "calls_with_a_chunk_over_10ms_late": sum(p["max"] > 10 for p in pacing),
        }
        if pacing
        else None,
        "client_failures": failures[:5],
        "refusals": report.get("refusals"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", default="1,10,50,100", help="comma-separated concurrent call counts")
    parser.add_argument("--window", type=float, default=10.0, help="measurement window per run, seconds")
    parser.add_argument("--stagger", type=float, default=0.0137, help="seconds between call starts")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--slots", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument(
        "--per-client",
        type=int,
        default=CALLS_PER_CLIENT,
        help="simulated callers per load-generator process (more processes: less client lag)",
    )
    parser.add_argument("--model", default="echo", help="model spec, e.g. synthetic:7b on a GPU box")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.slots, args.model)
        return
    if args.client:
        client(args.client, args.first, args.count, args.stagger, args.seconds)
        return
    runs = [run(int(n), args.window, args.stagger, args.model, args.per_client) for n in args.calls.split(",")]
    biggest = next((r for r in runs if r["calls"] == TARGETS["calls"]), None)
    met = None
    if biggest is not None and biggest["bal_ms"]:
        met = {
            "bal_p99_ms": biggest["bal_ms"]["p99"] <= TARGETS["bal_p99_ms"],
            "late_frames": biggest["late_frames"] == TARGETS["late_frames"],
            "cpu_percent_per_call": biggest["server_cpu_percent_per_call"] <= TARGETS["cpu_percent_per_call"],
        }
    print(
        json.dumps(
            {
                "benchmark": "bridge",
                "machine": machine(),
                "model": args.model,
                "targets": TARGETS,
                "met": met,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
