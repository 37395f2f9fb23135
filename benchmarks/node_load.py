"""A real ``xswarm serve`` node and the traffic against it, for benchmarks/isolation.py and
benchmarks/soak.py.

``Node`` starts ``xswarm serve --model echo`` in a home of its own (bridge, supervisor, and the
webhooks in their child process), with a registered SMS user, Twilio signatures and call
tokens on, and 127.0.0.1 as its trusted proxy (the deployment the README recommends: a TLS
proxy in front, each client's address in ``X-Forwarded-For``). The traffic: echo calls
through the bridge simulator (tokens minted as the voice webhook would), signed SMS at a
fixed rate, supervisors listening, and readings of the node (snapshot, RSS, open files).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.audio import mulaw  # noqa: E402
from engine.bridge.simulator import StreamTarget, stream_call  # noqa: E402
from engine.events import CallEnded, CallStarted, Listen  # noqa: E402
from engine.supervisor.client import SupervisorClient  # noqa: E402
from engine.telephony.calltoken import Claims, mint  # noqa: E402

AUTH_TOKEN = "bench-twilio-auth-token-0123456789"
TOKEN_SECRET = "bench-call-token-secret-0123456789"
OPERATOR = "bench-operator-token-0123456789"
MONITOR = "bench-monitor-token-0123456789"
PUBLIC_URL = "https://hooks.bench.invalid"
SMS_USER = "+15551230001"
TWILIO_ADDRESS = "54.172.60.1"
"""The ``X-Forwarded-For`` of signed traffic (a Twilio address, as the proxy would see it)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _sendgrid_public_key() -> str:
    """A P-256 public key as SendGrid shows it (base64 DER): the node checks mail signatures."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    der = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(der).decode()


class Node:
    """``xswarm serve`` with the echo model; ``stop()`` ends it and its children."""

    def __init__(self, slots: int) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="xswarm-bench-node-"))
        self.bridge_port, self.supervisor_port, self.webhooks_port = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "XSWARM_HOME": str(self.home),
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "XSWARM_CALL_TOKEN_SECRET": TOKEN_SECRET,
            "XSWARM_PUBLIC_URL": PUBLIC_URL,
            "XSWARM_SUPERVISOR_TOKEN": OPERATOR,
            "XSWARM_SUPERVISOR_MONITOR_TOKEN": MONITOR,
            "XSWARM_SERVER__TRUSTED_PROXIES": '["127.0.0.1"]',
            "SENDGRID_WEBHOOK_PUBLIC_KEY": _sendgrid_public_key(),
            "XSWARM_LLM__PROVIDER": "none",
            "XSWARM_LOG_LEVEL": "WARNING",
        }
        self.cli(["users", "add", "--name", "Bench", "--phone", SMS_USER, "--email", "bench@example.com"])
        self.proc = subprocess.Popen(
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
                str(self.bridge_port),
                "--supervisor-port",
                str(self.supervisor_port),
                "--webhooks-port",
                str(self.webhooks_port),
            ],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"xswarm serve exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if self.health().get("model") and self.http(self.webhooks_port, "/health")["status"] == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("xswarm serve did not become ready in 90 s")
            time.sleep(0.3)
        self.process = psutil.Process(self.proc.pid)
        log(f"node ready: pid {self.proc.pid}, webhooks child pids {self.webhook_pids()}")

    def cli(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "xswarm_tui.cli", *args], env=self.env, cwd=ROOT, capture_output=True, text=True
        )

    @staticmethod
    def http(port: int, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    def health(self) -> dict[str, Any]:
        return self.http(self.supervisor_port, "/health")

    def webhook_children(self) -> list[psutil.Process]:
        """The webhook worker processes (not multiprocessing's resource tracker)."""
        return [
            child
            for child in psutil.Process(self.proc.pid).children()
            if any("spawn_main" in part for part in child.cmdline())
        ]

    def webhook_pids(self) -> list[int]:
        return [child.pid for child in self.webhook_children()]

    def rss_mib(self) -> dict[str, float]:
        """The node process and its webhook workers, apart."""
        children = self.webhook_children()
        return {
            "node": round(self.process.memory_info().rss / 2**20, 1),
            "webhooks": round(sum(c.memory_info().rss for c in children) / 2**20, 1),
        }

    def open_files(self) -> dict[str, int]:
        children = self.webhook_children()
        return {"node": self.process.num_fds(), "webhooks": sum(c.num_fds() for c in children)}

    async def snapshot(self) -> dict[str, Any]:
        """The runtime's snapshot, through a fresh monitor connection."""
        async with SupervisorClient(f"ws://127.0.0.1:{self.supervisor_port}/", MONITOR, name="bench-probe") as c:
            return await c.wait_snapshot()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.home / "data" / "xswarm.db", timeout=30) as conn:
            return conn.execute(sql).fetchall()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def speech_band(seconds: float, seed: int = 1) -> bytes:
    """Speech-band noise, 8 kHz mu-law (what a caller sends)."""
    n = int(seconds * 8000)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum[(np.fft.rfftfreq(n, 1 / 8000) < 300) | (np.fft.rfftfreq(n, 1 / 8000) > 3000)] = 0
    x = np.fft.irfft(spectrum, n)
    return bytes(mulaw.encode((0.3 * x / np.abs(x).max()).astype(np.float32)))


@dataclass
class Calls:
    """``concurrent`` echo calls kept live: each lasts ``min_s``–``max_s`` and is replaced.
    Runs in a process of its own (``CallsProcess``), so the benchmark's other clients cannot
    delay its 20 ms pacing."""

    bridge_port: int
    concurrent: int
    min_s: float
    max_s: float
    first_lane: int = 0
    """This process's first lane number (CallSids and caller numbers carry the lane)."""
    placed: int = 0
    failed: list[str] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    live: set[str] = field(default_factory=set)

    async def run(self, until: float) -> None:
        audio = speech_band(self.max_s + 1)
        rng = np.random.default_rng(7)

        async def lane(k: int) -> None:
            await asyncio.sleep(k * 0.05)
            while time.monotonic() < until:
                length = min(float(rng.uniform(self.min_s, self.max_s)), until - time.monotonic())
                if length < 1:
                    return
                self.placed += 1
                sid = f"CA{self.first_lane + k:04d}{self.placed:06d}{'0' * 22}"
                caller = f"+1555900{self.first_lane + k:04d}"
                token = mint(TOKEN_SECRET, sid, claims=Claims(None, caller, "xswarm"))
                target = StreamTarget(f"ws://127.0.0.1:{self.bridge_port}/twilio", {"token": token})
                self.live.add(sid)
                try:
                    report = await stream_call(
                        target, audio[: int(length * 8000)], auth_token=AUTH_TOKEN, call_sid=sid, tail_s=0.3
                    )
                except Exception as exc:  # a call that could not run is counted, not fatal
                    self.failed.append(f"{sid}: {exc}")
                    await asyncio.sleep(2.0)  # as a caller would, before calling again
                    continue
                finally:
                    self.live.discard(sid)
                if report.close_code not in (None, 1000):
                    self.failed.append(f"{sid}: closed {report.close_code} {report.close_reason}")
                    await asyncio.sleep(2.0)
                self.reports.append(
                    {
                        "call_sid": sid,
                        "gap_ms_p99": report.gap_ms.get("p99"),
                        "send_late_ms_max": report.send_late_ms.get("max"),
                        "chunks": report.chunks_received,
                    }
                )

        await asyncio.gather(*(lane(k) for k in range(self.concurrent)))


@dataclass
class Sms:
    """Signed SMS to the webhooks at ``rate`` per second; latency of each answer."""

    node: Node
    rate: float
    first_sid: int = 0
    """Where this sender's MessageSids start (several senders on one node must not collide)."""
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    sent_ok: int = 0

    async def run(self, until: float) -> None:
        import aiohttp
        from twilio.request_validator import RequestValidator

        validator = RequestValidator(AUTH_TOKEN)
        url = f"http://127.0.0.1:{self.node.webhooks_port}/twilio/sms"
        k = self.first_sid
        start = time.monotonic() - self.first_sid / self.rate
        # Idle keep-alive connections close after 1 s: the extra ones opened while two answers
        # overlapped would otherwise stay open and read as the node's file descriptors growing.
        connector = aiohttp.TCPConnector(keepalive_timeout=1.0)
        async with aiohttp.ClientSession(connector=connector) as session:
            pending: set[asyncio.Task[None]] = set()

            async def one(n: int) -> None:
                sid = f"SM{n:08d}{'0' * 24}"
                form = {"MessageSid": sid, "AccountSid": "AC0", "From": SMS_USER, "To": "+15005550006", "Body": "help"}
                headers = {
                    "X-Twilio-Signature": validator.compute_signature(PUBLIC_URL + "/twilio/sms", form),
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Forwarded-For": TWILIO_ADDRESS,
                }
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=urlencode(form), headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    status = 0
                self.latencies_ms.append((time.perf_counter() - t0) * 1000)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 200:
                    self.sent_ok += 1

            while time.monotonic() < until:
                k += 1
                task = asyncio.create_task(one(k))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(max(0.0, start + k / self.rate - time.monotonic()))
            await asyncio.gather(*pending)

    def stored(self) -> int:
        return int(self.node.query("SELECT COUNT(*) FROM webhook_inbox WHERE provider = 'twilio-sms'")[0][0])


class CallsProcess:
    """``Calls`` in child processes of at most ``PER_PROCESS`` callers each (``python
    benchmarks/node_load.py calls ...``), so the callers' own event loops never fall behind
    their 20 ms pacing; ``result()`` waits for them and merges their figures."""

    PER_PROCESS = 10

    def __init__(self, node: Node, concurrent: int, min_s: float, max_s: float, seconds: float) -> None:
        self.reports: list[dict[str, Any]] = []
        """One per completed call, once ``result()`` has returned."""
        self.procs: list[subprocess.Popen[str]] = []
        for first in range(0, concurrent, self.PER_PROCESS):
            count = min(self.PER_PROCESS, concurrent - first)
            args = [str(node.bridge_port), str(count), str(min_s), str(max_s), str(seconds), str(first)]
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "calls", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
                )
            )

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        parts = []
        for proc in self.procs:
            out, _ = proc.communicate(timeout=timeout)
            parts.append(json.loads(out) if out.strip() else {"error": f"calls process exited {proc.returncode}"})
        if any("error" in part for part in parts):
            return {"errors": [part["error"] for part in parts if "error" in part]}
        reports = self.reports = [r for part in parts for r in part["reports"]]
        gaps = [r["gap_ms_p99"] for r in reports if r["gap_ms_p99"] is not None]
        late_sends = [r["send_late_ms_max"] for r in reports if r["send_late_ms_max"] is not None]
        return {
            "processes": len(parts),
            "placed": sum(part["placed"] for part in parts),
            "completed": len(reports),
            "failed": sum(part["failed"] for part in parts),
            "failures": [f for part in parts for f in part["failures"]][:10],
            "client_gap_ms_p99_median": percentile(gaps, 50),
            "client_gap_ms_p99_max": percentile(gaps, 100),
            "caller_send_late_ms_max_median": percentile(late_sends, 50),
            "caller_send_late_ms_max_max": percentile(late_sends, 100),
        }


def pin(pids: list[int]) -> dict[str, list[int]] | None:
    """Put the processes ``pids`` (every thread) on CPU 0 and this process, with everything
    it starts from now on (callers, browsers, attackers, commands), on the other CPUs: the
    system under test apart from its load, as when callers and browsers are elsewhere. None
    on a 1-CPU box."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    for pid in pids:
        for thread in psutil.Process(pid).threads():
            os.sched_setaffinity(thread.id, {cpus[0]})
    os.sched_setaffinity(0, set(cpus[1:]))
    return {"node": cpus[:1], "load": cpus[1:]}


def nice_attacker() -> None:
    """In an attacker process: run at the lowest priority. On this one box the attackers'
    own CPU would otherwise be taken from the node, which real, remote attackers cannot do."""
    os.nice(19)


async def listeners(node: Node, count: int, until: float) -> dict[str, int]:
    """``count`` supervisors, each listening to a live call and moving to another when it
    ends. Each follows the live calls on its own connection (its snapshot, then CallStarted
    and CallEnded), as a console does."""
    frames = {"audio_frames": 0, "relistens": 0}

    async def one(i: int) -> None:
        token = OPERATOR if i == 0 else MONITOR
        async with SupervisorClient(f"ws://127.0.0.1:{node.supervisor_port}/", token, name=f"bench{i}") as client:
            live = {str(call["call_id"]) for call in (client.snapshot or {}).get("calls", [])}
            listening: str | None = None

            async def audio() -> None:
                async for _ in client.audio():
                    frames["audio_frames"] += 1

            reader = asyncio.create_task(audio())
            while time.monotonic() < until:
                if listening not in live and live:
                    choices = sorted(live)
                    listening = choices[(i * 7) % len(choices)]
                    try:
                        await client.command(Listen(listening))  # type: ignore[call-arg]
                        frames["relistens"] += 1
                    except Exception:  # the call ended between the choice and the command
                        live.discard(listening)
                        listening = None
                try:
                    message = await client.next_message(timeout=max(0.01, min(2.0, until - time.monotonic())))
                except TimeoutError:
                    continue
                if isinstance(message, CallStarted):
                    live.add(message.call_id)
                elif isinstance(message, CallEnded):
                    live.discard(message.call_id)
            reader.cancel()

    await asyncio.gather(*(one(i) for i in range(count)))
    return frames


async def every(period_s: float, until: float, sample: Callable[[], Any]) -> None:
    """Call ``sample()`` (awaiting it when it is a coroutine) every ``period_s`` until ``until``."""
    next_at = time.monotonic()
    while next_at < until:
        result = sample()
        if asyncio.iscoroutine(result):
            await result
        next_at += period_s
        await asyncio.sleep(max(0.0, min(next_at, until) - time.monotonic()))


def _calls_main(argv: list[str]) -> None:
    port, concurrent, min_s, max_s = int(argv[0]), int(argv[1]), float(argv[2]), float(argv[3])
    seconds, first_lane = float(argv[4]), int(argv[5])
    try:
        # Real callers send from elsewhere: ahead of the node and the attackers for this box's
        # CPU, so that a frame counted late was late at the node, not held up in this process.
        os.nice(-5)
    except PermissionError:
        pass
    calls = Calls(port, concurrent, min_s, max_s, first_lane=first_lane)
    # Everything imported so far lives as long as the process: out of the collector's sight, so
    # that a full collection (~12 ms with it) never holds up ten callers' 20 ms pacing.
    gc.collect()
    gc.freeze()
    asyncio.run(calls.run(time.monotonic() + seconds))
    summary = {"placed": calls.placed, "failed": len(calls.failed), "failures": calls.failed[:10]}
    print(json.dumps({**summary, "reports": calls.reports}))


if __name__ == "__main__" and sys.argv[1:2] == ["calls"]:
    _calls_main(sys.argv[2:])
