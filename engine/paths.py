"""Where xswarm keeps its files.

XDG folders by default; ``XSWARM_HOME=<dir>`` puts everything under one folder instead, which
is what tests and isolated runs (several nodes on one box) rely on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

APP = "xswarm"


@dataclass(frozen=True)
class Paths:
    """The four folders xswarm writes to, resolved once from the environment."""

    config: Path
    data: Path
    state: Path
    cache: Path

    @property
    def config_file(self) -> Path:
        """The TOML settings file (``XSWARM_CONFIG_FILE`` overrides it)."""
        override = os.environ.get("XSWARM_CONFIG_FILE")
        return Path(override) if override else self.config / "config.toml"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def database(self) -> Path:
        return self.data / "xswarm.db"

    @property
    def storage(self) -> Path:
        """The local object-storage folder used when no S3/R2 bucket is configured."""
        return self.data / "storage"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def resolve_paths() -> Paths:
    """Read ``XSWARM_HOME`` or the XDG variables now (not at import: tests change them)."""
    home = os.environ.get("XSWARM_HOME")
    if home:
        root = Path(home).expanduser()
        return Paths(root / "config", root / "data", root / "state", root / "cache")
    return Paths(
        _xdg("XDG_CONFIG_HOME", ".config") / APP,
        _xdg("XDG_DATA_HOME", ".local/share") / APP,
        _xdg("XDG_STATE_HOME", ".local/state") / APP,
        _xdg("XDG_CACHE_HOME", ".cache") / APP,
    )
