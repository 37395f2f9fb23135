"""Shared fixtures. Server fixtures (sqld, the moto S3 server) live in tests/fixtures/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import ALIASES

pytest_plugins: list[str] = ["fixtures.sqld", "fixtures.s3", "fixtures.fleet", "fixtures.runtime"]


@pytest.fixture(autouse=True)
def xswarm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own XSWARM_HOME and no provider credentials from the machine."""
    home = tmp_path / "xswarm-home"
    monkeypatch.setenv("XSWARM_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("XSWARM_") and name != "XSWARM_HOME" or name in ALIASES:
            monkeypatch.delenv(name, raising=False)
    yield home


@pytest.fixture(autouse=True)
def background_priority(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Commands run in-process here (``CliRunner``) must not lower the test process's own CPU
    and I/O priority for every later test: ``run_in_background`` is recorded instead.
    ``tests/test_priority.py`` checks the real one in a process of its own."""
    calls: list[str] = []
    monkeypatch.setattr("engine.priority.run_in_background", lambda: calls.append("background"))
    return calls
