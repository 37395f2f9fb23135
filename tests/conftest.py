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
