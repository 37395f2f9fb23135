"""Signed Twilio SMS through the webhook server, with the database write, on 127.0.0.1.

The server (WebhooksServer with its inbox processor, embedded SQLite file, no LLM provider so the
reply is the canned one) runs in its own process, as `xswarm webhooks serve` runs it (uvloop,
tune_server_process after start; XSWARM_BENCH_ASYNCIO_LOOP=1 / XSWARM_BENCH_DEFAULT_GC=1 turn those off);
the load comes from `wrk` in another process (or, without wrk, from an aiohttp client process).
Every request carries a unique MessageSid signed with the twilio SDK's RequestValidator, so every request is verified,
stored in webhook_inbox through the group-commit writer and answered with TwiML.

Prints one JSON object: per run requests/s, p50/p99 latency, server CPU ms per request
(server process user+sys CPU time / requests), non-2xx count, rows stored; and medians.

``--workers N`` (N > 1) runs the real ``xswarm webhooks serve --workers N`` instead (N
processes on one port, see webhooks/workers.py); CPU is then the whole process tree's. The
XSWARM_BENCH_* switches above apply to the one-process server only.

    .venv/bin/python benchmarks/webhooks.py [--duration 10] [--connections 32] [--runs 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine  # noqa: E402

TOKEN = "bench-twilio-auth-token"
PUBLIC = "https://hooks.bench.example"
KNOWN = "+14155550100"
PROCESS = os.environ.get("XSWARM_BENCH_INGEST_ONLY") != "1"
"""The inbox processor runs in the server unless XSWARM_BENCH_INGEST_ONLY=1 (ingest path alone)."""
QUIET_GC = os.environ.get("XSWARM_BENCH_DEFAULT_GC") != "1"
FAST_LOOP = os.environ.get("XSWARM_BENCH_ASYNCIO_LOOP") != "1"
"""The server runs on uvloop (as `xswarm webhooks serve` does) unless XSWARM_BENCH_ASYNCIO_LOOP=1."""

WRK_SCRIPT = r"""
-- Whole requests are formatted once, here: formatting each one in request() cost wrk more
-- CPU than the rest of its work, on a box whose two cores the server shares.
local rows = {}
for line in io.lines(os.getenv("XSWARM_BENCH_REQUESTS")) do
  local tab = line:find("\t", 1, true)
  rows[#rows + 1] = wrk.format("POST", "/twilio/sms", {
    ["Host"] = os.getenv("XSWARM_BENCH_HOST"),
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["X-Twilio-Signature"] = line:sub(1, tab - 1),
  }, line:sub(tab + 1))
end
local i = 0
request = function()
  i = i + 1
  return rows[(i - 1) % #rows + 1]
end
local non2xx = 0
response = function(status, headers, body)
  if status ~= 200 then non2xx = non2xx + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
      + summary.errors.status))
end
"""


def settings_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "XSWARM_HOME": str(home),
        "TWILIO_AUTH_TOKEN": TOKEN,
        "XSWARM_PUBLIC_URL": PUBLIC,
        "XSWARM_LLM__PROVIDER": "none",
        "PYTHONPATH": str(ROOT),
    }


# --------------------------------------------------------------------------- the server


def serve(port_file: Path) -> None:
    """Child process: the webhook server until stdin closes."""
    from engine.config import load_settings
    from engine.events import EventBus
    from engine.logging_setup import configure
    from engine.store.migrations import open_database
    from webhooks.limits import RateLimit
    from webhooks.server import WebhooksServer, tune_server_process
    from webhooks.server import run as run_server

    configure()
    settings = load_settings()

    async def run() -> None:
        db = open_database(settings)
        # The limiter stays in the path, set above the offered load.
        server = WebhooksServer(
            settings, db, EventBus(), rate_limit=RateLimit(1e6, 1e6), process=PROCESS, inline_reads=True
        )  # as `xswarm webhooks serve` runs it
        await server.start("127.0.0.1", 0)
        if QUIET_GC:
            tune_server_process()
        port_file.write_text(str(server.port))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()
        db.close()

    run_server(run(), fast_loop=FAST_LOOP)


# ------------------------------------------------------------------------------- loads


def signed_requests(count: int, run: int) -> list[tuple[str, str]]:
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(TOKEN)
    out = []
    for i in range(count):
        sid = f"SM{run:02d}{i:030d}"
        params = {
            "ToCountry": "US",
            "ToState": "CA",
            "SmsMessageSid": sid,
            "NumMedia": "0",
            "ToCity": "SAN FRANCISCO",
            "FromZip": "94105",
            "SmsSid": sid,
            "FromState": "CA",
            "SmsStatus": "received",
            "FromCity": "SAN FRANCISCO",
            "Body": "help" if i % 2 else "status",
            "FromCountry": "US",
            "To": "+14155550199",
            "ToZip": "94105",
            "NumSegments": "1",
            "MessageSid": sid,
            "AccountSid": "AC" + "0" * 32,
            "From": KNOWN if i % 4 else "+14155559999",
            "ApiVersion": "2010-04-01",
        }
        out.append((validator.compute_signature(PUBLIC + "/twilio/sms", params), urlencode(params)))
    return out


def run_wrk(port: int, requests_file: Path, script: Path, duration: int, connections: int) -> dict[str, float]:
    env = {**os.environ, "XSWARM_BENCH_REQUESTS": str(requests_file), "XSWARM_BENCH_HOST": f"127.0.0.1:{port}"}
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("{"))
    return json.loads(line)


def run_aiohttp(port: int, rows: list[tuple[str, str]], duration: int, connections: int) -> dict[str, float]:
    """Fallback load generator (when wrk is not installed), in a child process."""
    code = f"""
import asyncio, json, sys, time, aiohttp
rows = json.load(sys.stdin)
lat = []; errors = 0; i = 0
async def worker(session, stop):
    global i, errors
    while time.perf_counter() < stop:
        sig, body = rows[i % len(rows)]; i += 1
        t = time.perf_counter()
        async with session.post("http://127.0.0.1:{port}/twilio/sms", data=body.encode(),
            headers={{"X-Twilio-Signature": sig, "Content-Type": "application/x-www-form-urlencoded"}}) as r:
            await r.read()
            errors += r.status != 200
        lat.append(time.perf_counter() - t)
async def main():
    start = time.perf_counter(); stop = start + {duration}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit={connections})) as s:
        await asyncio.gather(*[worker(s, stop) for _ in range({connections})])
    took = time.perf_counter() - start
    lat.sort()
    print(json.dumps({{"requests": len(lat), "duration_us": took * 1e6, "p50_us": lat[len(lat)//2] * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6, "max_us": lat[-1] * 1e6, "errors": errors}}))
asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(rows), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- driver


def prepare(home: Path) -> None:
    env = settings_env(home)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from engine.config import load_settings\n"
            "from engine.store.migrations import open_database\n"
            "from engine.store.users import create_user\n"
            "db = open_database(load_settings())\n"
            f"create_user(db, name='Bench', phone='{KNOWN}', email='bench@example.com', tier='enterprise')\n"
            "db.close()\n",
        ],
        env=env,
        check=True,
        cwd=ROOT,
    )


def start_one(home: Path, run: int) -> tuple[subprocess.Popen[bytes], int]:
    """The one-process server (this file's ``--serve`` child); its port."""
    port_file = home / f"port-{run}"
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(port_file)],
        env=settings_env(home),
        stdin=subprocess.PIPE,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return server, int(port_file.read_text())


def start_workers(home: Path, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    """``xswarm webhooks serve --workers N`` as an operator runs it (the limiter in the path,
    set above the offered load); its port, from the line it prints."""
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("xswarm")),
            "webhooks",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--rate-limit",
            "1000000",
        ],
        env=settings_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert server.stdout is not None
    line = server.stdout.readline().decode()
    if "listening on http://" not in line:
        server.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return server, int(line.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])


def stop(server: subprocess.Popen[bytes], workers: int) -> None:
    if workers > 1:
        server.send_signal(signal.SIGTERM)
    elif server.stdin:
        server.stdin.close()
    server.wait(timeout=60)


def tree_cpu(proc: psutil.Process) -> float:
    """User+system CPU seconds of a process and its children."""
    total = 0.0
    for each in [proc, *proc.children(recursive=True)]:
        try:
            total += sum(each.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def one_run(home: Path, run: int, args: argparse.Namespace) -> dict[str, float]:
    server, port = start_workers(home, args.workers) if args.workers > 1 else start_one(home, run)
    try:
        rows = signed_requests(args.requests, run)
        requests_file = home / f"requests-{run}.tsv"
        requests_file.write_text("".join(f"{sig}\t{body}\n" for sig, body in rows))
        script = home / "sms.lua"
        script.write_text(WRK_SCRIPT)
        proc = psutil.Process(server.pid)
        before_rows = _inbox_rows(home)
        cpu0 = tree_cpu(proc)
        if shutil.which("wrk") and not args.aiohttp:
            result = run_wrk(port, requests_file, script, args.duration, args.connections)
            tool = "wrk"
        else:
            result = run_aiohttp(port, rows, args.duration, args.connections)
            tool = "aiohttp"
        cpu1 = tree_cpu(proc)
        time.sleep(1.0)  # let the last group commits land before counting rows
        stored = _inbox_rows(home) - before_rows
    finally:
        stop(server, args.workers)
    requests = int(result["requests"])
    seconds = result["duration_us"] / 1e6
    return {
        "load": tool,
        "requests": requests,
        "requests_per_s": round(requests / seconds, 1),
        "p50_ms": round(result["p50_us"] / 1000, 2),
        "p99_ms": round(result["p99_us"] / 1000, 2),
        "max_ms": round(result["max_us"] / 1000, 2),
        "cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / max(1, requests), 3),
        "errors_or_non_2xx": int(result["errors"]),
        "rows_stored": stored,
        "unique_requests": min(requests, args.requests),
    }


def _inbox_rows(home: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(home / "data" / "xswarm.db")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM webhook_inbox").fetchone()[0])
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=60_000, help="distinct signed SMS prepared per run")
    parser.add_argument("--aiohttp", action="store_true", help="use the aiohttp load generator even if wrk exists")
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes (> 1: xswarm webhooks serve --workers N)"
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    with tempfile.TemporaryDirectory(prefix="xswarm-bench-webhooks-") as tmp:
        home = Path(tmp)
        prepare(home)
        runs = [one_run(home, run, args) for run in range(args.runs)]
    print(
        json.dumps(
            {
                "benchmark": "webhooks: signed Twilio SMS (verify + inbox insert + TwiML)"
                + (", inbox processor running" if PROCESS else ", ingest only (processor off)"),
                "machine": machine(),
                "workers": args.workers,
                "connections": args.connections,
                "duration_s": args.duration,
                "median": {
                    key: statistics.median(r[key] for r in runs)
                    for key in ("requests_per_s", "p50_ms", "p99_ms", "cpu_ms_per_request")
                },
                "targets": {"requests_per_s": ">= 3000", "p99_ms": "<= 30", "cpu_ms_per_request": "<= 1"},
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
