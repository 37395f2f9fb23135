"""Supervisor benchmark: 50 echo calls and 10 supervisor clients against a real `xswarm serve`.

Three processes, so each figure belongs to one of them: the runtime (`xswarm serve --model echo`,
whose CPU is measured with psutil), a load process streaming the background calls through the
bridge's Twilio simulator, and this process, which runs the supervisor clients and two probe
calls (also the simulator) that time what a person would notice:

- event fan-out delay: receive time at each supervisor minus the event's own ``at`` stamp;
- server CPU: calls only, then with the supervisors watching, then with each of them listening;
- listen: how far behind the caller a listener hears a 20 ms burst (and tap -> client alone);
- takeover switch: ``takeover`` sent -> the probe caller receives the operator's audio
  (target <= 200 ms), repeated with hand-backs in between.

    .venv/bin/python benchmarks/supervisor.py [--calls 50 --supervisors 10 --seconds 6]

Prints ONE JSON object on stdout (progress on stderr); ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import emit, machine  # noqa: E402
from engine.audio import mulaw  # noqa: E402
from engine.bridge.simulator import StreamTarget, stream_call  # noqa: E402
from engine.events import HandBack, Listen, TakeOver  # noqa: E402
from engine.supervisor.client import SupervisorClient  # noqa: E402

OPERATOR = "bench-operator-token-0123456789"
MONITOR = "bench-monitor-token-0123456789"
CHUNK = 160
SILENCE = bytes(mulaw.encode(np.zeros(CHUNK, np.float32)))
TONE = bytes(mulaw.encode((0.5 * np.sin(2 * np.pi * 440 * np.arange(CHUNK) / 8000)).astype(np.float32)))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def level(ulaw: bytes) -> float:
    return float(np.sqrt(np.mean(mulaw.decode(ulaw) ** 2)))


def stats_ms(values_s: list[float]) -> dict[str, Any]:
    if not values_s:
        return {"n": 0}
    ms = np.asarray(values_s) * 1000
    return {
        "n": int(ms.size),
        "p50": round(float(np.percentile(ms, 50)), 2),
        "p99": round(float(np.percentile(ms, 99)), 2),
        "max": round(float(ms.max()), 2),
        "mean": round(float(ms.mean()), 2),
    }


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str) -> float:
    """Sum of every sample of one metric in Prometheus text (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"^{re.escape(name)}(\{{.*\}})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


class CpuMeter:
    """CPU of the server process over a window, in percent of one core."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)

    def start(self) -> None:
        t = self.proc.cpu_times()
        self.cpu0, self.wall0 = t.user + t.system, time.monotonic()

    def stop(self) -> float:
        t = self.proc.cpu_times()
        return round(100 * (t.user + t.system - self.cpu0) / (time.monotonic() - self.wall0), 1)


# ------------------------------------------------------------------------------ load process


async def run_load(bridge_url: str, calls: int, seconds: float) -> None:
    """Background calls: a quiet tone for ``seconds`` each, started 20 ms apart."""
    quiet = bytes(mulaw.encode((0.05 * np.sin(2 * np.pi * 200 * np.arange(CHUNK) / 8000)).astype(np.float32)))
    audio = quiet * int(seconds / 0.02)

    async def one(i: int) -> None:
        await asyncio.sleep(i * 0.02)
        report = await stream_call(
            StreamTarget(bridge_url, {"caller": f"+1555000{i:04d}"}), audio, call_sid=f"CALOAD{i:04d}"
        )
        if report.close_code not in (None, 1000):
            log(f"load call {i} closed {report.close_code} {report.close_reason}")

    await asyncio.gather(*(one(i) for i in range(calls)))


# ------------------------------------------------------------------------------- measuring


class Probe:
    """A simulator call in the background that records when chunks left and what came back."""

    def __init__(self, bridge_url: str, call_sid: str, audio: bytes) -> None:
        self.call_sid = call_sid
        self.sent: dict[int, float] = {}
        self.heard: list[tuple[float, float]] = []
        self.task = asyncio.get_running_loop().create_task(
            stream_call(
                StreamTarget(bridge_url, {"caller": "+15559990000"}),
                audio,
                call_sid=call_sid,
                on_sent=lambda k, _t: self.sent.__setitem__(k, time.time()),
                on_media=lambda _t, payload: self.heard.append((time.time(), level(payload))),
            )
        )

    def first_heard_after(self, t0: float, above: float = 0.05) -> float | None:
        for at, lvl in list(self.heard):
            if at >= t0 and lvl > above:
                return at
        return None


class Watcher:
    """One supervisor client that timestamps every event and audio frame it receives."""

    def __init__(self, client: SupervisorClient) -> None:
        self.client = client
        self.delays: list[float] = []
        self.by_type: dict[str, int] = {}
        self.audio_delays: list[float] = []
        self.loud: list[tuple[str, float]] = []
        """(call_id, received_at) of caller-direction frames with sound in them."""
        self.recording = False
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._events()), loop.create_task(self._audio())]

    async def _events(self) -> None:
        async for message in self.client.messages():
            at = getattr(message, "at", None)
            if self.recording and at is not None:
                self.delays.append(time.time() - at)
                name = type(message).__name__
                self.by_type[name] = self.by_type.get(name, 0) + 1

    async def _audio(self) -> None:
        async for frame in self.client.audio():
            if self.recording:
                self.audio_delays.append(frame.delay_s)
                if frame.direction == "caller" and float(np.sqrt(np.mean(frame.pcm**2))) > 0.05:
                    self.loud.append((frame.call_id, frame.received_at))

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


async def measure(args: argparse.Namespace, server_pid: int, bridge_port: int, sup_port: int) -> dict[str, Any]:
    bridge_url = f"ws://127.0.0.1:{bridge_port}/twilio"
    sup_url = f"ws://127.0.0.1:{sup_port}/"
    cpu = CpuMeter(server_pid)
    seconds = args.seconds
    total = 6 * seconds + 2 * args.takeovers + 20

    # Two probe calls are part of the 50: one carries bursts for the listen figure, one is
    # taken over and back repeatedly.
    every = 20  # a 20 ms burst every 400 ms
    bursts = set(range(100, int(total / 0.02), every))
    listen_audio = b"".join(TONE if k in bursts else SILENCE for k in range(int(total / 0.02)))
    listen_probe = Probe(bridge_url, "CAPROBELISTEN", listen_audio)
    takeover_probe = Probe(bridge_url, "CAPROBETAKEOVER", SILENCE * int(total / 0.02))
    while json.loads(http_get(sup_port, "/health"))["calls"] < args.calls:
        await asyncio.sleep(0.1)
    log(f"{args.calls} calls live")
    await asyncio.sleep(1.0)
    metrics0 = http_get(sup_port, "/metrics")

    cpu.start()
    await asyncio.sleep(seconds)
    cpu_calls_only = cpu.stop()

    clients = [
        SupervisorClient(sup_url, OPERATOR if i == 0 else MONITOR, name=f"bench{i}") for i in range(args.supervisors)
    ]
    for c in clients:
        await c.start()
    watchers = [Watcher(c) for c in clients]
    await asyncio.sleep(0.5)
    for w in watchers:
        w.recording = True
    cpu.start()
    await asyncio.sleep(seconds)
    cpu_watching = cpu.stop()
    fanout = [d for w in watchers for d in w.delays]
    event_counts: dict[str, int] = {}
    for w in watchers:
        for name, n in w.by_type.items():
            event_counts[name] = event_counts.get(name, 0) + n
    log(f"fan-out: {len(fanout)} events to {args.supervisors} supervisors, server CPU {cpu_watching}%")

    # every supervisor listens to a call; the first monitor listens to the burst probe
    live_ids = ["CAPROBELISTEN"] + [f"CALOAD{i:04d}" for i in range(args.supervisors)]
    for w, call_id in zip(watchers[1:], live_ids, strict=False):
        await w.client.command(Listen(call_id))
    await watchers[0].client.command(Listen(live_ids[-1]))
    for w in watchers:
        w.audio_delays.clear()
        w.loud.clear()
    start_listen = time.time()
    cpu.start()
    await asyncio.sleep(seconds)
    cpu_listening = cpu.stop()
    tap_delays = [d for w in watchers for d in w.audio_delays]
    behind = []
    for call_id, received in watchers[1].loud:
        if call_id != "CAPROBELISTEN" or received < start_listen:
            continue
        sent = [t for k, t in listen_probe.sent.items() if k in bursts and t <= received]
        if sent and received - max(sent) < 0.4:
            behind.append(received - max(sent))
    # one frame per burst: the first loud frame after each burst
    behind = sorted(set(round(b, 6) for b in behind))
    log(f"listen: {len(tap_delays)} audio frames, server CPU {cpu_listening}%")

    op = clients[0]
    tone = (0.5 * np.sin(2 * np.pi * 300 * np.arange(1920) / 24000)).astype(np.float32)
    switches, acks = [], []
    for _ in range(args.takeovers):
        t0 = time.time()
        await op.command(TakeOver("CAPROBETAKEOVER"))
        acks.append(time.time() - t0)
        for _ in range(6):  # what a microphone sends: 80 ms at a time, in real time
            await op.send_audio("CAPROBETAKEOVER", tone)
            await asyncio.sleep(0.08)
        heard = takeover_probe.first_heard_after(t0)
        if heard is not None:
            switches.append(heard - t0)
        await op.command(HandBack("CAPROBETAKEOVER"))
        await asyncio.sleep(0.6)
    log(f"takeover: {len(switches)}/{args.takeovers} heard")

    metrics1 = http_get(sup_port, "/metrics")
    for w in watchers:
        w.stop()
    for c in clients:
        await c.close()
    for probe in (listen_probe, takeover_probe):
        probe.task.cancel()
    switch = stats_ms(switches)
    return {
        "benchmark": "supervisor",
        "calls": args.calls,
        "supervisors": args.supervisors,
        "model": "echo",
        "window_s": seconds,
        "machine": machine(),
        "server_cpu_percent_of_one_core": {
            "calls_only": cpu_calls_only,
            "with_supervisors_watching": cpu_watching,
            "with_supervisors_listening": cpu_listening,
        },
        "event_fanout_delay_ms": stats_ms(fanout),
        "events_received": event_counts,
        "listen": {
            "behind_caller_ms": stats_ms(behind),
            "tap_to_client_ms": stats_ms(tap_delays),
            "target_ms": 150,
        },
        "takeover_switch_ms": {
            **switch,
            "target_ms": 200,
            "met": bool(switch.get("n") == args.takeovers and switch["max"] <= 200),
        },
        "takeover_ack_ms": stats_ms(acks),
        "server_during_run": {
            "missed_ticks": metric(metrics1, "xswarm_missed_ticks_total")
            - metric(metrics0, "xswarm_missed_ticks_total"),
            "late_frames": metric(metrics1, "xswarm_late_frames_total") - metric(metrics0, "xswarm_late_frames_total"),
            "supervisor_dropped": metric(metrics1, "xswarm_supervisor_dropped_total"),
            "supervisor_slow_disconnects": metric(metrics1, "xswarm_supervisor_slow_disconnects_total"),
        },
    }


# ---------------------------------------------------------------------------------- the node


@dataclass
class Node:
    """A real ``xswarm serve --model echo`` on free ports, with the benchmark's two tokens, and
    the load process that streams background calls into it (benchmarks/web.py uses it too)."""

    server: subprocess.Popen[bytes]
    env: dict[str, str]
    bridge_port: int
    sup_port: int

    @classmethod
    def start(cls, slots: int) -> Node:
        home = tempfile.mkdtemp(prefix="xswarm-bench-sup-")
        bridge_port, sup_port = free_port(), free_port()
        env = {
            **os.environ,
            "XSWARM_HOME": home,
            "XSWARM_SUPERVISOR_TOKEN": OPERATOR,
            "XSWARM_SUPERVISOR_MONITOR_TOKEN": MONITOR,
            "XSWARM_LOG_LEVEL": "WARNING",
        }
        for name in ("TWILIO_AUTH_TOKEN", "XSWARM_CALL_TOKEN_SECRET"):
            env.pop(name, None)  # loopback bench: no signatures or call tokens to forge
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xswarm_tui.cli",
                "serve",
                "--model",
                "echo",
                "--slots",
                str(slots),
                "--bridge-port",
                str(bridge_port),
                "--supervisor-port",
                str(sup_port),
                "--webhooks-port",
                "0",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        node = cls(server, env, bridge_port, sup_port)
        try:
            node._wait_ready()
        except BaseException:
            node.stop()
            raise
        return node

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            if self.server.poll() is not None:
                assert self.server.stderr is not None
                raise SystemExit(f"xswarm serve exited: {self.server.stderr.read().decode()[-2000:]}")
            try:
                if json.loads(http_get(self.sup_port, "/health")).get("model"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("xswarm serve did not become ready in 60 s")
            time.sleep(0.2)

    def start_load(self, calls: int, seconds: float) -> subprocess.Popen[bytes]:
        """``calls`` background calls (``run_load``) in a process of their own."""
        return subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--load",
                f"ws://127.0.0.1:{self.bridge_port}/twilio",
                "--calls",
                str(calls),
                "--load-seconds",
                str(seconds),
            ],
            env=self.env,
            cwd=ROOT,
        )

    def stop(self, *others: subprocess.Popen[bytes] | None) -> None:
        for proc in (*others, self.server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50, help="live calls in all, two of them probes")
    ap.add_argument("--supervisors", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each measuring window")
    ap.add_argument("--takeovers", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--load", default=None, help=argparse.SUPPRESS)  # child mode: bridge URL
    ap.add_argument("--load-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load:
        asyncio.run(run_load(args.load, args.calls, args.load_seconds))
        return 0
    if args.calls < 2 + args.supervisors:
        ap.error("--calls must be at least --supervisors + 2 (each supervisor listens to its own call)")

    node = Node.start(slots=args.calls + 4)
    load = None
    try:
        log(f"server ready (pid {node.server.pid}); starting {args.calls - 2} load calls")
        load = node.start_load(args.calls - 2, 6 * args.seconds + 2 * args.takeovers + 30)
        report = asyncio.run(measure(args, node.server.pid, node.bridge_port, node.sup_port))
    finally:
        node.stop(load)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
