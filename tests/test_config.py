"""Settings: file, XSWARM_* variables, provider names, clear errors, masked secrets."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from engine.config import MASK, ConfigError, default_toml, load_settings, public_view
from engine.paths import resolve_paths


def _write(text: str) -> Path:
    path = resolve_paths().config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file(xswarm_home: Path) -> None:
    settings = load_settings()
    assert settings.server.host == "127.0.0.1"
    assert (settings.server.bridge_port, settings.server.supervisor_port, settings.server.webhooks_port) == (
        9998,
        9999,
        8787,
    )
    assert settings.model.name == "auto" and settings.database.url is None
    assert resolve_paths().config_file == xswarm_home / "config" / "config.toml"


def test_precedence_env_nested_over_alias_over_file(monkeypatch: pytest.MonkeyPatch) -> None:
    _write('[model]\nname = "echo"\ncontext = 750\n[twilio]\naccount_sid = "ACfile"\n')
    settings = load_settings()
    assert (settings.model.name, settings.model.context, settings.twilio.account_sid) == ("echo", 750, "ACfile")
    monkeypatch.setenv("XSWARM_MODEL", "synthetic:tiny")
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "ACalias")
    assert load_settings().model.name == "synthetic:tiny"
    assert load_settings().twilio.account_sid == "ACalias"
    monkeypatch.setenv("XSWARM_MODEL__NAME", "moshi")
    monkeypatch.setenv("XSWARM_TWILIO__ACCOUNT_SID", "ACnested")
    settings = load_settings()
    assert (settings.model.name, settings.twilio.account_sid, settings.model.context) == ("moshi", "ACnested", 750)


def test_config_file_can_be_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "other.toml"
    elsewhere.write_text("[server]\nbridge_port = 19998\n")
    monkeypatch.setenv("XSWARM_CONFIG_FILE", str(elsewhere))
    assert load_settings().server.bridge_port == 19998


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[server]\nhost = "127.0.0.1"\nbridge_port = "lots"\n',
            r"config key 'server\.bridge_port' \(.*config\.toml:3\): .*integer",
        ),
        ("[model]\ncontext = 10\n", r"'model\.context' \(.*:2\): .*greater than or equal to 50"),
        ("[server]\nbrige_port = 1\n", r"'server\.brige_port' \(.*:2\): Extra inputs"),
        ("[mystery]\na = 1\n", r"'mystery' \(.*:1\): Extra inputs"),
        ("[server\nport = 1\n", r"config\.toml: not valid TOML: .*line 1"),
        ('[model]\ndtype = "fp4"\n', r"'model\.dtype' \(.*:2\)"),
    ],
)
def test_broken_file_names_key_and_line(text: str, expected: str) -> None:
    _write(text)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSWARM_SERVER__WEBHOOKS_PORT", "99999")
    with pytest.raises(
        ConfigError, match=r"'server\.webhooks_port' \(environment variable XSWARM_SERVER__WEBHOOKS_PORT\)"
    ):
        load_settings()


@pytest.mark.parametrize("key", ["transfer_number", "from_number"])
def test_twilio_numbers_must_be_e164(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(f'[twilio]\n{key} = "415 555 0101"\n')
    with pytest.raises(ConfigError, match=rf"'twilio\.{key}' \(.*config\.toml:2\): .*not E\.164"):
        load_settings()
    _write(f'[twilio]\n{key} = " +14155550101 "\n')
    assert getattr(load_settings().twilio, key) == "+14155550101"
    monkeypatch.setenv("TWILIO_FROM_NUMBER", "14155550101")
    with pytest.raises(ConfigError, match=r"'twilio\.from_number' \(environment variable TWILIO_FROM_NUMBER\)"):
        load_settings()


def test_secrets_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "tw-secret-value")
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_secret")
    monkeypatch.setenv("TURSO_AUTH_TOKEN", "turso-secret")
    settings = load_settings()
    assert settings.twilio.auth_token is not None and settings.twilio.auth_token.get_secret_value() == "tw-secret-value"
    for text in (repr(settings), str(settings), str(public_view(settings))):
        assert "tw-secret-value" not in text and "sk_test_secret" not in text and "turso-secret" not in text
    view = public_view(settings)
    assert view["twilio"]["auth_token"] == MASK and view["stripe"]["webhook_secret"] is None


def test_default_file_parses_documents_and_round_trips() -> None:
    text = default_toml()
    data = tomllib.loads(text)
    assert data and all(not values for values in data.values())  # every key commented out
    assert "# bridge_port = 9998" in text and "env: TWILIO_AUTH_TOKEN" in text
    assert "Twilio Media Streams WebSocket" in text  # field docs become comments
    _write(text)
    defaults = load_settings()
    _write(text.replace("# bridge_port = 9998", "bridge_port = 12345"))
    changed = load_settings()
    assert changed.server.bridge_port == 12345
    assert changed.model_dump() == defaults.model_dump() | {
        "server": defaults.server.model_dump() | {"bridge_port": 12345}
    }
