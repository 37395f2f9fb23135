"""Soak benchmark: a node under steady mixed load for ``--minutes``, watched for drift.

A real ``xswarm serve`` node (benchmarks/node_load.py: echo model, webhooks in their child
process). For the whole run: 30 echo calls churning (each lasts 20–60 s and is replaced by a
new one), signed SMS at 20/s, 3 supervisors each listening to a live call (moving on when it
ends), and ``xswarm backup create`` every 5 minutes. Every 10 s it reads the runtime's
snapshot (BAL p99 over the recent window, late frames, missed ticks), the RSS and the open
file descriptors of the node process and of its webhook worker.

Goals (issue 13): 0 late frames; RSS and open files flat (growth ≤ 5 % from the end of the
first 5 minutes to the end); BAL p99 over the last 5 minutes within 10 % of the first 5.

The callers run on the same box, in processes of 10; each reports its own worst send delay,
and the late frames are split by it. ``--pin`` keeps the node (and its webhook process) on
CPU 0 and every load process on the others, as when callers are elsewhere.

    .venv/bin/python benchmarks/soak.py --minutes 30 [--pin] [--out FILE]

Prints ONE JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.node_load import CallsProcess, Node, Sms, every, listeners, log, percentile, pin  # noqa: E402
from benchmarks.report import emit, machine  # noqa: E402

LATE_SEND_MS = 20.0
"""A caller that sent a chunk this late (one chunk's length) can miss a tick whatever the node
does."""
CALLS = 30
SMS_RATE = 20.0
SUPERVISORS = 3
BACKUP_EVERY_S = 300.0
SAMPLE_EVERY_S = 10.0
WINDOW_S = 300.0


async def measure(node: Node, minutes: float) -> dict[str, Any]:
    seconds = minutes * 60
    window = min(WINDOW_S, seconds / 3)
    calls = CallsProcess(node, CALLS, min_s=20, max_s=60, seconds=seconds + 5)
    while node.health()["calls"] < CALLS // 2:
        await asyncio.sleep(0.2)
    start = time.monotonic()
    until = start + seconds
    first = await node.snapshot()
    samples: list[dict[str, Any]] = []
    backups: list[dict[str, Any]] = []

    async def sample() -> None:
        snap = await node.snapshot()
        samples.append(
            {
                "t_s": round(time.monotonic() - start, 1),
                "calls": len(snap.get("calls", [])),
                "bal_ms_p99": snap["bridge"]["bal_ms"]["p99"],
                "late_frames": snap["scheduler"]["late_frames"] - first["scheduler"]["late_frames"],
                "missed_ticks": snap["scheduler"]["missed_ticks"] - first["scheduler"]["missed_ticks"],
                "rss_mib": node.rss_mib(),
                "open_files": node.open_files(),
            }
        )
        if len(samples) % 6 == 0:
            log(f"{samples[-1]}")

    async def backup() -> None:
        t0 = time.monotonic()
        done = await asyncio.to_thread(node.cli, ["backup", "create"])
        backups.append(
            {
                "t_s": round(t0 - start, 1),
                "seconds": round(time.monotonic() - t0, 2),
                "ok": done.returncode == 0,
                "error": done.stderr.strip()[-300:] if done.returncode else None,
            }
        )

    sms = Sms(node, SMS_RATE)
    supervision = asyncio.create_task(listeners(node, SUPERVISORS, until))
    await asyncio.gather(
        sms.run(until),
        every(SAMPLE_EVERY_S, until, sample),
        every(BACKUP_EVERY_S, until, backup),
        supervision,
    )
    placed = await asyncio.to_thread(calls.result, 180.0)
    late_by_call = dict(node.query("SELECT id, late_frames FROM calls WHERE late_frames > 0"))
    sent_late = {r["call_sid"]: r["send_late_ms_max"] or 0.0 for r in calls.reports}
    caller_late = sum(n for sid, n in late_by_call.items() if sent_late.get(sid, 0.0) >= LATE_SEND_MS)
    attribution = {
        f"late_frames_on_calls_whose_caller_sent_{LATE_SEND_MS:.0f}ms_late": caller_late,
        "late_frames_on_other_calls": sum(late_by_call.values()) - caller_late,
        "calls_with_late_frames": len(late_by_call),
    }
    listened = supervision.result()
    stored = sms.stored()

    def window_values(key: str, lo: float, hi: float, pick: Any = lambda v: v) -> list[float]:
        return [pick(s[key]) for s in samples if lo <= s["t_s"] <= hi and s[key] is not None]

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 3) if values else None

    def growth(key: str, part: str) -> float | None:
        early = mean(window_values(key, window - 2 * SAMPLE_EVERY_S, window + SAMPLE_EVERY_S, lambda v: v[part]))
        late = mean(window_values(key, seconds - 3 * SAMPLE_EVERY_S, seconds, lambda v: v[part]))
        return round(100 * (late - early) / early, 2) if early and late is not None else None

    bal_first = mean(window_values("bal_ms_p99", 0, window))
    bal_last = mean(window_values("bal_ms_p99", seconds - window, seconds))
    last = samples[-1] if samples else {}
    growths = {
        f"{key}_{part}_growth_pct": growth(key, part)
        for key in ("rss_mib", "open_files")
        for part in ("node", "webhooks")
    }
    report: dict[str, Any] = {
        "benchmark": "soak",
        "machine": machine(),
        "minutes": minutes,
        "calls_concurrent": CALLS,
        "calls_client": placed,
        "late_frames": last.get("late_frames"),
        "late_frames_note": "a late frame is caller audio not all there at its tick; the callers run on this "
        "same box, so a frame is also late when the caller's own process sent it late (below, by each call's "
        "worst send delay as the caller measured it)",
        "late_frames_by_caller": attribution,
        "missed_ticks": last.get("missed_ticks"),
        "bal_ms_p99": {"first_window_mean": bal_first, "last_window_mean": bal_last, "window_s": window},
        **growths,
        "sms": {
            "sent": len(sms.latencies_ms),
            "statuses": sms.statuses,
            "stored": stored,
            "p50_ms": percentile(sms.latencies_ms, 50),
            "p99_ms": percentile(sms.latencies_ms, 99),
        },
        "supervisors": {"count": SUPERVISORS, **listened},
        "backups": backups,
        "samples": samples,
    }
    report["goals"] = {
        "no_late_frames": last.get("late_frames") == 0,
        "rss_and_open_files_flat_5pct": all(v is not None and v <= 5 for v in growths.values()),
        "bal_p99_last_within_10pct_of_first": bool(bal_first and bal_last and bal_last <= 1.1 * bal_first),
        "every_signed_sms_stored": stored == sms.sent_ok == len(sms.latencies_ms),
        "every_backup_ok": bool(backups) and all(b["ok"] for b in backups),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--label", default=None, help="stored in the report (e.g. '2-core box shared with other work')")
    ap.add_argument("--pin", action="store_true", help="the node and its webhooks on CPU 0, all the load on the others")
    args = ap.parse_args(argv)
    node = Node(slots=CALLS + 4)
    try:
        pinned = pin([node.proc.pid, *node.webhook_pids()]) if args.pin else None
        report = asyncio.run(measure(node, args.minutes))
        report["cpu_pinning"] = pinned
    finally:
        node.stop()
    if args.label:
        report["label"] = args.label
    emit(report, args.out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
