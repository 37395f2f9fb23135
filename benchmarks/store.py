"""Store throughput and CLI start-up, as JSON.

    .venv/bin/python benchmarks/store.py [--events N] [--runs R]

- events/s through the batching writer (``engine.store.feed.append``: one ``submit`` per event,
  the way the runtime records its bus), from the first submit until the last event's future
  has resolved (= committed), for the embedded file and for a real sqld that this script
  starts on 127.0.0.1 (median of R runs, each on a fresh database);
- ``xswarm --help`` wall time, median of several runs.
Targets (issue 2, 2-core box): >= 20,000 events/s embedded, >= 5,000 to sqld, help < 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.store import feed, migrations  # noqa: E402
from engine.store.db import Database, Target  # noqa: E402
from tests.fixtures.sqld import SqldServer, sqld_binary  # noqa: E402


def events_per_second(target: Target, events: int) -> dict[str, float]:
    with Database(target) as db:
        migrations.migrate(db)
        started = time.perf_counter()
        futures = [feed.append(db, type="Bench", summary=f"event {i}", call_id="CA-bench") for i in range(events)]
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - started
        stored = db.query("SELECT COUNT(*) FROM events WHERE type = 'Bench'")[0][0]
        assert stored == events, (stored, events)
        return {"events_per_s": events / elapsed, "commits": db.commits}


def median_run(make_target, events: int, runs: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    results = []
    for _ in range(runs):
        with make_target() as target:
            results.append(events_per_second(target, events))
    rates = sorted(r["events_per_s"] for r in results)
    return {
        "events": events,
        "runs": runs,
        "events_per_s_median": round(statistics.median(rates)),
        "events_per_s_min": round(rates[0]),
        "commits_per_run": round(statistics.median(r["commits"] for r in results)),
    }


class _FileTarget:
    def __enter__(self) -> Target:
        self.folder = Path(tempfile.mkdtemp(prefix="xswarm-bench-"))
        return Target(str(self.folder / "bench.db"))

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _SqldTarget:
    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def __enter__(self) -> Target:
        self.folder = Path(tempfile.mkdtemp(prefix="xswarm-bench-sqld-"))
        self.server = SqldServer(self.binary, self.folder).start()
        return self.server.target()

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def help_wall_time(runs: int) -> dict[str, float]:
    script = Path(sys.executable).with_name("xswarm")
    command = (
        [str(script), "--help"]
        if script.exists()
        else [sys.executable, "-c", "from xswarm_tui.cli import main; main()", "--help"]
    )
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return {"runs": runs, "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    binary = sqld_binary()
    report = {
        "benchmark": "store",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "embedded_file": median_run(_FileTarget, args.events, args.runs),
        "sqld": median_run(lambda: _SqldTarget(binary), args.events, args.runs)
        if binary
        else {"skipped": "sqld binary not found"},
        "xswarm_help": help_wall_time(7),
        "targets": {"embedded_events_per_s": 20_000, "sqld_events_per_s": 5_000, "xswarm_help_s": 0.3},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
