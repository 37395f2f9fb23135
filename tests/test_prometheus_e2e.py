"""A real Prometheus scrapes a real echo node and its two webhook workers, and alerts.

Everything runs as an operator would run it: ``xswarm serve --model echo``, ``xswarm webhooks
serve --workers 2`` and ``prometheus`` with deploy/'s alert rules, each its own process on
127.0.0.1 ports picked for this test, scraping every second. The node is then frozen with
SIGSTOP for 1.5 s: its tick falls behind by ~18 ticks, which it counts as missed when it
wakes, and XswarmMissedTicks must fire. Only that rule's ``for:`` is shortened (1 minute ->
0 s) so the test does not wait a minute; its expression is the deployed one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from webhooks_support import PUBLIC_URL, TWILIO_TOKEN, twilio_post

from tests.fixtures.sqld import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
GPU_ONLY = {"xswarm_gpu_memory_used_bytes", "xswarm_gpu_memory_total_bytes"}
"""Series a machine without an NVIDIA GPU does not have."""

pytestmark = pytest.mark.slow


def get(url: str, timeout: float = 3.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(args, cwd=ROOT, env=os.environ.copy(), stdout=handle, stderr=subprocess.STDOUT)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case the test stopped in the middle of a freeze
            proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = json.loads(get(f"{self.base}/api/v1/{path}{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None


def names_in(exposition: str) -> set[str]:
    """Metric family names an exposition declares (``# TYPE`` lines; a labelled counter with no
    samples yet is declared too)."""
    out = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            out.add(name if kind != "counter" or name.endswith("_total") else f"{name}_total")
    return out


def test_prometheus_scrapes_node_and_workers_and_fires_missed_ticks(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    prometheus_bin = shutil.which("prometheus")
    promtool = shutil.which("promtool")
    if prometheus_bin is None or promtool is None:
        pytest.fail("prometheus is not installed: run .ci/setup --dev (as root), or apt-get install -y prometheus")
    bridge, supervisor, hooks, prom = free_port(), free_port(), free_port(), free_port()
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("XSWARM_PUBLIC_URL", PUBLIC_URL)
    xswarm = [sys.executable, "-m", "xswarm_tui.cli"]
    node = start(
        [
            *xswarm,
            "serve",
            "--model",
            "echo",
            "--bridge-port",
            str(bridge),
            "--supervisor-port",
            str(supervisor),
            "--webhooks-port",
            "0",
        ],
        tmp_path / "node.out",
    )
    processes.append(node)
    processes.append(
        start([*xswarm, "webhooks", "serve", "--port", str(hooks), "--workers", "2"], tmp_path / "hooks.out")
    )
    wait_for("the node", lambda: json.loads(get(f"http://127.0.0.1:{bridge}/health"))["status"] == "ok")
    wait_for("the webhooks", lambda: json.loads(get(f"http://127.0.0.1:{hooks}/health")))

    # Twenty separate connections: the kernel spreads them over both workers, yet whichever
    # worker answers /metrics must count all twenty.
    health_count = re.compile(r'^xswarm_webhook_requests_total\{code="200",route="/health"\} (\S+)$', re.M)

    def health_requests() -> float:
        text = get(f"http://127.0.0.1:{hooks}/metrics").decode()
        match = health_count.search(text)
        assert match is not None, text
        return float(match.group(1))

    baseline = health_requests()
    for _ in range(20):
        get(f"http://127.0.0.1:{hooks}/health")
    assert {health_requests() for _ in range(6)} == {baseline + 20}

    # A signed SMS from an unknown number: stored, then applied by one worker's processor.
    body, headers = twilio_post(
        {"MessageSid": "SM" + "0" * 32, "From": "+14155550199", "To": "+14155550100", "Body": "hi"}, "/twilio/sms"
    )
    request = urllib.request.Request(f"http://127.0.0.1:{hooks}/twilio/sms", data=body, headers=headers)
    assert urllib.request.urlopen(request, timeout=10).status == 200
    done = re.compile(r'^xswarm_webhook_events_processed_total\{outcome="done",provider="twilio-sms"\} 1\.0$', re.M)
    wait_for("the SMS to be processed", lambda: done.search(get(f"http://127.0.0.1:{hooks}/metrics").decode()), 30)

    # Naming conventions, checked by Prometheus' own linter on both expositions, and every
    # series docs/monitoring.md documents is there.
    exposed: set[str] = set()
    for port in (supervisor, hooks):
        text = get(f"http://127.0.0.1:{port}/metrics")
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
        exposed |= names_in(text.decode())
    documented = set(re.findall(r"`(xswarm_[a-z_]+)`", (ROOT / "docs" / "monitoring.md").read_text()))
    assert documented - GPU_ONLY <= exposed, f"documented but not exposed: {sorted(documented - GPU_ONLY - exposed)}"
    assert exposed <= documented, f"exposed but not documented: {sorted(exposed - documented)}"

    rules = yaml.safe_load((DEPLOY / "xswarm-alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "XswarmMissedTicks":
                rule["for"] = "0s"
    (tmp_path / "xswarm-alerts.yml").write_text(yaml.safe_dump(rules))
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"}
    config.pop("alerting")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["xswarm-node"]["static_configs"] = [{"targets": [f"127.0.0.1:{supervisor}"]}]
    jobs["xswarm-webhooks"]["static_configs"] = [{"targets": [f"127.0.0.1:{hooks}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    processes.append(
        start(
            [
                prometheus_bin,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom}",
            ],
            tmp_path / "prometheus.out",
        )
    )
    server = Prometheus(prom)

    def both_up() -> bool:
        targets = server.api("targets")["activeTargets"]
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    wait_for("both targets up", both_up)
    names = set(server.api("label/__name__/values"))
    for series in (
        "xswarm_calls_open",
        "xswarm_model_step_duration_seconds_bucket",
        "xswarm_webhook_inbox_events",
        "xswarm_webhook_request_duration_seconds_bucket",
        "xswarm_backup_last_success_timestamp_seconds",
    ):
        assert series in names, series
    assert server.value('xswarm_webhook_requests_total{route="/health",code="200"}') == baseline + 20
    assert server.value('xswarm_webhook_inbox_events{status="dead"}') == 0.0
    assert server.value("xswarm_model_ready") == 1.0

    wait_for("the missed-ticks series", lambda: server.value("xswarm_missed_ticks_total") is not None, 30)
    before = server.value("xswarm_missed_ticks_total") or 0.0
    node.send_signal(signal.SIGSTOP)
    time.sleep(1.5)
    node.send_signal(signal.SIGCONT)

    def firing() -> list[dict[str, Any]]:
        return [
            a
            for a in server.api("alerts")["alerts"]
            if a["labels"]["alertname"] == "XswarmMissedTicks" and a["state"] == "firing"
        ]

    alerts = wait_for("XswarmMissedTicks to fire", firing, 30)
    assert alerts[0]["labels"]["instance"] == f"127.0.0.1:{supervisor}" and alerts[0]["labels"]["severity"] == "page"
    after = server.value("xswarm_missed_ticks_total") or 0.0
    assert after - before >= 10  # 1.5 s frozen is ~18 ticks of 80 ms

    # Every rule evaluates without error on real series, and so does every dashboard query.
    rules_health = [r for g in server.api("rules")["groups"] for r in g["rules"]]
    assert len(rules_health) == sum(len(g["rules"]) for g in rules["groups"])
    assert all(r["health"] == "ok" for r in rules_health), [(r["name"], r.get("lastError")) for r in rules_health]
    board = json.loads((ROOT / "deploy" / "grafana" / "xswarm.json").read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$node", ".*").replace("$webhooks", ".*")
            server.api("query", query=expr)  # raises on an execution error
