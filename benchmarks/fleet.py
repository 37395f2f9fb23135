"""Fleet routing: 3 echo nodes and one sqld on this box, calls placed through the signed voice
webhook in bursts, a drain, a resume and a SIGKILL in the middle.

Everything is real except Twilio, which ``engine.bridge.simulator.place_call`` plays: the
signed voice webhook, the ``<Connect><Stream>`` it answers, a real-time media stream, and, when
a stream ends before the caller is done, the signed ``<Connect action>`` callback and the stream
it answers with. Nodes are ``xswarm serve --model echo`` processes and the webhook server is
``xswarm webhooks serve``, all on one sqld.

Plan (default 60 calls, bursts of 10): bursts 1-2 with every node ready; node-c drained
(``xswarm nodes drain``) for bursts 3-4; resumed for burst 5, during which node-b is killed
with SIGKILL once its calls are live; burst 6 after the kill.

Prints one JSON object: calls per node in each burst and its max/min over the nodes that were
ready, the voice webhook's answer time (signature, inbox write, user read and the routing
write) and the routing decision alone (``routing.reserve`` against sqld, 10 at a time), calls
sent to a draining or dead node, and for the killed node's callers the seconds from Twilio's
action callback to audio from the new node, and calls lost.

    .venv/bin/python benchmarks/fleet.py [--calls 60] [--burst 10] [--seconds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import fleet  # noqa: E402
from fixtures.sqld import SqldServer, sqld_binary  # noqa: E402

from benchmarks.report import emit, machine  # noqa: E402
from engine.audio.testsignal import speech_band_ulaw  # noqa: E402
from engine.bridge.simulator import PlacedCall, place_call  # noqa: E402
from engine.store import nodes, routing  # noqa: E402

NODES = ("node-a", "node-b", "node-c")
DRAINED, KILLED = "node-c", "node-b"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


async def burst(hooks_url: str, index: int, size: int, audio: bytes) -> list[asyncio.Task[PlacedCall]]:
    return [
        asyncio.create_task(
            place_call(
                hooks_url, fleet.TWILIO_TOKEN, audio, call_sid=f"CA{index:02d}{i:04d}", account_sid=fleet.ACCOUNT_SID
            )
        )
        for i in range(size)
    ]


async def run(f: fleet.Fleet, procs: dict[str, fleet.FleetProcess], hooks_url: str, args: Any) -> dict[str, Any]:
    by_url = {p.extra["bridge_url"] + "/twilio": name for name, p in procs.items()}
    audio = speech_band_ulaw(args.seconds, seed=60)
    bursts = args.calls // args.burst
    plan: list[dict[str, Any]] = []
    calls: list[PlacedCall] = []
    kill_at: float | None = None
    for index in range(bursts):
        step: dict[str, Any] = {"burst": index + 1, "ready": [n for n in NODES if n != KILLED or kill_at is None]}
        if index == 2:
            assert (await asyncio.to_thread(f.cli, "nodes", "drain", DRAINED)).returncode == 0
        if index == 4:
            assert (await asyncio.to_thread(f.cli, "nodes", "resume", DRAINED)).returncode == 0
        if index in (2, 3):
            step["ready"] = [n for n in NODES if n != DRAINED]
            step["draining"] = DRAINED
        # every burst starts from idle nodes: the last burst's ends have reached their rows
        await asyncio.to_thread(fleet.wait_until, lambda: all(n.live_calls == 0 for n in nodes.live_nodes(f.db)))
        tasks = await burst(hooks_url, index, args.burst, audio)
        if index == 4:  # once this burst is streaming, node-b dies without a word
            await asyncio.to_thread(fleet.wait_until, lambda: _live(f, KILLED) > 0)
            await asyncio.sleep(0.5)
            procs[KILLED].kill()
            kill_at = time.time()
            step["killed"] = KILLED
        placed = await asyncio.gather(*tasks)
        first = Counter(by_url.get(p.nodes[0], "?") if p.nodes else "none" for p in placed)
        counts = [first.get(n, 0) for n in step["ready"]]
        step["calls_per_node"] = dict(sorted(first.items()))
        step["max_over_min"] = round(max(counts) / min(counts), 3) if min(counts) else None
        plan.append(step)
        calls += placed
    return {"bursts": plan, "calls": calls, "kill_at": kill_at}


def _live(f: fleet.Fleet, node_id: str) -> int:
    node = nodes.get(f.db, node_id)
    return node.live_calls if node is not None else 0


async def routing_decisions(f: fleet.Fleet, rounds: int, size: int) -> list[float]:
    """``routing.reserve`` alone against sqld, ``size`` at a time (reservations removed after)."""
    import aiohttp

    loop = asyncio.get_running_loop()
    times: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def one(sid: str) -> None:
            started = loop.time()
            await routing.reserve(f.db, sid, ttl_s=60, session=session)
            times.append((loop.time() - started) * 1000)

        for r in range(rounds):
            sids = [f"CAR{size:02d}{r:03d}{i:03d}" for i in range(size)]
            await asyncio.gather(*(one(sid) for sid in sids))
            f.db.write(f"DELETE FROM route_reservations WHERE call_sid IN ({','.join('?' * len(sids))})", sids)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per call (each call streams in real time)")
    parser.add_argument("--slots", type=int, default=8, help="slots per node")
    parser.add_argument("--label", default="2core_shared")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    binary = sqld_binary()
    if binary is None:
        sys.exit("sqld not found: run `bash .ci/setup --dev`")
    with tempfile.TemporaryDirectory() as tmp, SqldServer(binary, Path(tmp) / "sqld") as server:
        f = fleet.Fleet(server, Path(tmp) / "fleet")
        try:
            procs = dict(zip(NODES, f.nodes(*NODES, slots=args.slots), strict=True))
            hooks = f.webhooks()
            outcome = asyncio.run(run(f, procs, hooks.extra["url"], args))
            decisions = asyncio.run(routing_decisions(f, 20, args.burst))
            alone = asyncio.run(routing_decisions(f, 100, 1))
        finally:
            f.close()
    calls: list[PlacedCall] = outcome["calls"]
    by_url = {p.extra["bridge_url"] + "/twilio": name for name, p in procs.items()}
    to_bad = 0
    for step, start in zip(outcome["bursts"], range(0, len(calls), args.burst), strict=True):
        for call in calls[start : start + args.burst]:
            for leg, url in enumerate(call.nodes):
                node = by_url.get(url)
                draining = step.get("draining") == node
                dead = node == KILLED and (step["burst"] > 5 or (step.get("killed") and leg > 0))
                to_bad += int(draining or bool(dead))
    moved = [c for c in calls if len(c.nodes) > 1]
    answers = [c.webhook_ms[0] for c in calls if c.webhook_ms]
    report = {
        "benchmark": "fleet",
        "label": args.label,
        "machine": machine(),
        "setup": {
            "nodes": len(NODES),
            "slots_per_node": args.slots,
            "calls": len(calls),
            "burst": args.burst,
            "seconds_per_call": args.seconds,
            "database": "sqld (one, on 127.0.0.1)",
        },
        "bursts": outcome["bursts"],
        "worst_max_over_min": max((b["max_over_min"] or 0) for b in outcome["bursts"]),
        "voice_webhook_answer_ms": {"p50": percentile(answers, 50), "p99": percentile(answers, 99)},
        "routing_decision_ms": {
            "p50": percentile(decisions, 50),
            "p99": percentile(decisions, 99),
            "count": len(decisions),
            "concurrent": args.burst,
        },
        "routing_decision_one_at_a_time_ms": {
            "p50": percentile(alone, 50),
            "p99": percentile(alone, 99),
            "count": len(alone),
        },
        "calls_to_draining_or_dead_nodes": to_bad,
        "sigkill": {
            "node": KILLED,
            "callers_moved": len(moved),
            "reroute_s": sorted(s for c in moved for s in c.reroute_s),
            "reroute_s_max": max((s for c in moved for s in c.reroute_s), default=None),
        },
        "calls_lost": sum(1 for c in calls if c.outcome != "completed"),
        "outcomes": dict(Counter(c.outcome for c in calls)),
    }
    emit(report, args.out, indent=2)


if __name__ == "__main__":
    main()
