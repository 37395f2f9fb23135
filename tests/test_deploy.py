"""Every file under deploy/ is checked by the program that will run it.

systemd-analyze, caddy, nginx and promtool are installed by ``.ci/setup --dev``; a missing one
fails the test with the command that installs it (a skipped check would pass a broken file).
Nothing here needs root: each tool gets a private copy whose machine-specific paths (the
install folder, certificates) point into a temporary folder.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tls_support import write_certificate

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = ("xswarm-node.service", "xswarm-webhooks.service")


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} is not installed: run .ci/setup --dev (as root), or apt-get install -y {package}")
    return found


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_systemd_units_verify_cleanly_and_are_hardened(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    xswarm = Path(sys.executable).with_name("xswarm")
    assert xswarm.exists(), "the xswarm console script is missing from the virtual environment"
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text()
        assert "EnvironmentFile=/etc/xswarm/xswarm.env" in text and "User=xswarm" in text
        text = text.replace("/opt/xswarm/.venv/bin/xswarm", str(xswarm))
        text = text.replace(
            "EnvironmentFile=/etc/xswarm/xswarm.env", f"EnvironmentFile={DEPLOY}/systemd/xswarm.env.example"
        )
        (tmp_path / unit).write_text(text)
    out = run(analyze, "verify", "--man=no", *(tmp_path / u for u in UNITS))
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    for unit in UNITS:
        # systemd's own exposure score, 0 (locked down) to 10 (none), printed as "1.9 OK";
        # --threshold takes it times ten. Both units score under 2 today; 3.0 leaves room.
        out = run(analyze, "security", "--offline=true", "--threshold=30", tmp_path / unit)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr


def test_the_env_example_holds_no_real_secret() -> None:
    for line in (DEPLOY / "systemd" / "xswarm.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert key.isupper() and "TOKEN" not in key and "KEY" not in key and "SECRET" not in key, line


def test_caddyfile_validates(tmp_path: Path) -> None:
    caddy = tool("caddy", "caddy")
    env = {
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [caddy, "validate", "--adapter", "caddyfile", "--config", str(DEPLOY / "caddy" / "Caddyfile")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0 and "Valid configuration" in out.stdout + out.stderr, out.stderr[-3000:]
    assert '"level":"warn"' not in out.stderr, out.stderr
    formatted = run(caddy, "fmt", DEPLOY / "caddy" / "Caddyfile")
    assert formatted.stdout == (DEPLOY / "caddy" / "Caddyfile").read_text(), (
        "run: caddy fmt --overwrite deploy/caddy/Caddyfile"
    )


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = tool("nginx", "nginx")
    cert, key = write_certificate(tmp_path, "localhost")
    site = (DEPLOY / "nginx" / "xswarm.conf").read_text()
    site = re.sub(r"/etc/letsencrypt/live/[^/]+/fullchain\.pem", str(cert), site)
    site = re.sub(r"/etc/letsencrypt/live/[^/]+/privkey\.pem", str(key), site)
    (tmp_path / "xswarm.conf").write_text(site)
    temp = " ".join(
        f"{kind}_temp_path {tmp_path / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\nevents {{}}\n"
        f"http {{\n  access_log {tmp_path / 'access.log'};\n  {temp}\n  include {tmp_path / 'xswarm.conf'};\n}}\n"
    )
    out = run(nginx, "-t", "-p", tmp_path, "-c", tmp_path / "nginx.conf", "-e", tmp_path / "error.log")
    assert out.returncode == 0 and "test is successful" in out.stderr, out.stderr
    assert "[warn]" not in out.stderr and "[emerg]" not in out.stderr, out.stderr


def test_proxies_agree_on_what_they_publish() -> None:
    """Both proxies: long stream timeouts, X-Forwarded-For set (never appended), no public /metrics."""
    nginx = (DEPLOY / "nginx" / "xswarm.conf").read_text()
    assert "$proxy_add_x_forwarded_for" not in nginx.split("# WebSockets")[1]
    assert nginx.count("proxy_set_header X-Forwarded-For $remote_addr;") == 4
    assert nginx.count("proxy_read_timeout 3600s;") == 2 and "client_max_body_size 31m;" in nginx
    assert nginx.count("location = /metrics") == 2
    caddy = (DEPLOY / "caddy" / "Caddyfile").read_text()
    assert caddy.count("respond /metrics 404") == 2 and "trusted_proxies" not in caddy.split("{", 1)[1]


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = tool("promtool", "prometheus")
    folder = DEPLOY / "prometheus"
    out = run(promtool, "check", "config", folder / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run(promtool, "check", "rules", folder / "xswarm-alerts.yml")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    out = run(promtool, "test", "rules", "xswarm-alerts_test.yml", cwd=folder)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "xswarm-alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_has_a_unit_test_an_action_and_a_doc_entry() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "xswarm-alerts_test.yml").read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    monitoring = (ROOT / "docs" / "monitoring.md").read_text()
    for rule in alert_rules():
        name = rule["alert"]
        assert name in firing, f"{name} has no promtool test that makes it fire"
        annotations = rule["annotations"]
        assert isinstance(annotations, dict) and annotations.get("action"), name
        assert f"`{name}`" in monitoring, f"docs/monitoring.md does not describe {name}"


def test_the_dashboard_is_valid_grafana_json_on_documented_metrics() -> None:
    board = json.loads((DEPLOY / "grafana" / "xswarm.json").read_text())
    assert board["title"] and board["uid"] and board["panels"]
    monitoring = (ROOT / "docs" / "monitoring.md").read_text()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel.get("type") == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            for name in re.findall(r"\b(xswarm_[a-z_]+?)(?:_bucket|_count|_sum)?\b", target["expr"]):
                assert f"`{name}`" in monitoring, f"{panel['title']}: {name} is not in docs/monitoring.md"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query as a recording rule (Grafana's variables filled in)."""
    promtool = tool("promtool", "prometheus")
    board = json.loads((DEPLOY / "grafana" / "xswarm.json").read_text())
    rules = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$node", ".*").replace("$webhooks", ".*")
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId'].lower()}", "expr": expr})
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run(promtool, "check", "rules", tmp_path / "dashboard.yml")
    assert out.returncode == 0, out.stdout + out.stderr
