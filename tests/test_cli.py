"""CLI smoke tests through Typer's runner, plus the real console entry for error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xswarm_tui.cli import app

runner = CliRunner()


def invoke(*args: str) -> object:
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_the_command_groups() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("config", "db", "users", "doctor"):
        assert name in result.stdout


def test_config_path_init_show(xswarm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("config", "path")
    assert result.stdout.strip() == str(xswarm_home / "config" / "config.toml")
    assert invoke("config", "init").exit_code == 0
    written = xswarm_home / "config" / "config.toml"
    assert written.read_text().startswith("# xswarm settings")
    assert oct(written.stat().st_mode & 0o777) == "0o600"
    again = invoke("config", "init")
    assert again.exit_code == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert invoke("config", "init", "--force").exit_code == 0
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "very-secret-token")
    shown = invoke("config", "show")
    assert shown.exit_code == 0 and "very-secret-token" not in shown.stdout
    assert 'auth_token = "********"' in shown.stdout and "bridge_port = 9998" in shown.stdout
    data = json.loads(invoke("config", "show", "--json").stdout)
    assert data["twilio"]["auth_token"] == "********" and data["server"]["bridge_port"] == 9998


def test_broken_config_is_one_line_and_exit_2(xswarm_home: Path) -> None:
    config = xswarm_home / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[server]\nbridge_port = "nope"\n')
    result = invoke("config", "show")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "server.bridge_port" in result.stderr and "config.toml:2" in result.stderr
    # The installed entry point: no traceback, same line, exit 2 — also for a TOML syntax error.
    config.write_text("[server\n")
    real = subprocess.run(
        [sys.executable, "-c", "from xswarm_tui.cli import main; main()", "users", "list"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=60,
    )
    assert real.returncode == 2, real.stderr
    assert "Traceback" not in real.stderr and real.stderr.count("\n") == 1
    assert "not valid TOML" in real.stderr and "line 1" in real.stderr and real.stdout == ""


def test_db_migrate_then_status_json() -> None:
    before = json.loads(invoke("db", "status", "--json").stdout)
    assert before["version"] == 0 and before["tables"] == []
    assert before["pending"] and before["pending"][0] == "0001_core"
    result = invoke("db", "migrate")
    assert result.exit_code == 0 and "schema version" in result.stdout
    status = json.loads(invoke("db", "status", "--json").stdout)
    assert set(status) == {"version", "pending", "tables"} and status["version"] >= 1
    assert status["pending"] == []
    assert {"users", "api_keys", "events", "webhook_inbox"} <= set(status["tables"])
    assert "nothing to apply" in invoke("db", "migrate").stdout


def test_db_commands_against_sqld(sqld, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TURSO_DATABASE_URL", sqld.url)
    assert invoke("db", "migrate").exit_code == 0
    status = json.loads(invoke("db", "status", "--json").stdout)
    assert status["version"] >= 1 and "users" in status["tables"]
    monkeypatch.setenv("TURSO_DATABASE_URL", "http://127.0.0.1:1")
    down = invoke("db", "status")
    assert down.exit_code == 1 and "cannot open http://127.0.0.1:1" in down.stderr


def test_users_lifecycle() -> None:
    added = invoke(
        "users", "add", "--name", "Ada", "--phone", "+14155550100", "--email", "ada@example.com", "--tier", "personal"
    )
    assert added.exit_code == 0 and "created user" in added.stdout
    listed = json.loads(invoke("users", "list", "--json").stdout)
    assert [(u["name"], u["phone"], u["tier"]) for u in listed] == [("Ada", "+14155550100", "personal")]
    user_id = listed[0]["id"]
    table = invoke("users", "list").stdout
    assert "Ada" in table and "+14155550100" not in table and "+1415•••0100" in table
    assert "+14155550100" in invoke("users", "list", "--reveal").stdout
    assert invoke("users", "set-tier", user_id, "professional").exit_code == 0
    assert json.loads(invoke("users", "show", "ada@example.com", "--json").stdout)["tier"] == "professional"
    assert invoke("users", "consent", user_id, "--recording").exit_code == 0
    assert json.loads(invoke("users", "show", user_id, "--json").stdout)["recording_consent"] is True
    assert invoke("users", "consent", "+14155550100", "--no-recording").exit_code == 0
    assert json.loads(invoke("users", "show", user_id, "--json").stdout)["recording_consent"] is False

    created = invoke("users", "key", "create", "+14155550100")
    key = created.stdout.strip()
    assert created.exit_code == 0 and key.startswith("xsk_") and "not shown again" in created.stderr
    shown = invoke("users", "show", user_id)
    assert key not in shown.stdout and key[:12] in shown.stdout
    key_id = json.loads(invoke("users", "show", user_id, "--json").stdout)["api_keys"][0]["id"]
    assert invoke("users", "key", "revoke", key_id).exit_code == 0
    again = invoke("users", "key", "revoke", key_id)
    assert again.exit_code == 1 and "no live API key" in again.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["users", "add", "--name", "X", "--phone", "555-0100", "--email", "x@example.com"], 2, "not E.164"),
        (["users", "add", "--name", "X", "--phone", "+14155550101", "--email", "x@"], 2, "not a valid address"),
        (
            ["users", "add", "--name", "X", "--phone", "+14155550101", "--email", "x@example.com", "--tier", "gold"],
            2,
            "unknown tier",
        ),
        (["users", "show", "nobody"], 1, "no user 'nobody'"),
        (["users", "set-tier", "nobody", "free"], 1, "no user"),
        (["users", "consent", "nobody", "--recording"], 1, "no user"),
        (["users", "key", "create", "nobody"], 1, "no user"),
    ],
)
def test_users_bad_input(args: list[str], code: int, message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == code and message in result.stderr and result.stderr.count("\n") == 1


def test_doctor_json_is_one_object_with_checks_and_capacity() -> None:
    result = invoke("doctor", "--json")
    report = json.loads(result.stdout)
    statuses = {c["status"] for c in report["checks"]}
    assert statuses <= {"pass", "warn", "fail"}
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in report["checks"])
    assert result.exit_code == (2 if "fail" in statuses else 1 if "warn" in statuses else 0)
    assert {"calls", "choices", "context_steps", "weights", "kv_cache"} <= set(report["capacity"])
    names = {c["name"] for c in report["checks"]}
    assert {"os", "cpu", "ram", "disk", "gpu", "portaudio", "python", "database", "storage", "model-weights"} <= names


def test_config_show_output_is_valid_toml(monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    monkeypatch.setenv("XSWARM_STRIPE__PRICE_TIERS", '{"price_1": "personal"}')
    parsed = tomllib.loads(invoke("config", "show").stdout)
    assert parsed["stripe"]["price_tiers"] == {"price_1": "personal"} and parsed["model"]["context"] == 3000


@pytest.mark.parametrize(
    "args", [["--theme", "nope"], ["attach", "ws://127.0.0.1:1", "--token", "t", "--theme", "nope"]]
)
def test_an_unknown_theme_flag_is_refused_before_the_console_starts(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert "unknown theme 'nope'" in result.stderr and "hal-9000" in result.stderr


def test_an_unknown_model_flag_is_refused_before_the_console_starts() -> None:
    result = invoke("--model", "bogus")
    assert result.exit_code == 2 and "unknown model 'bogus'" in result.stderr and "echo" in result.stderr
