"""What the console remembers between starts: the theme last chosen in the palette.

Kept in ``<state>/console.json`` rather than written into ``config.toml``: the settings file is
the operator's (comments, layout, secrets), and a theme picked with two keystrokes should not
rewrite it. An explicit choice still wins: ``--theme`` first, then ``ui.theme`` when the
settings (file or ``XSWARM_UI__THEME``) set it, then the remembered theme, then the default.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.files import write_atomically

log = logging.getLogger("xswarm.tui.preferences")

FILE = "console.json"


def _path(state: Path) -> Path:
    return state / FILE


def remembered_theme(state: Path) -> str | None:
    """The theme saved by the last console, or None (no file, or one that is not ours)."""
    try:
        data: Any = json.loads(_path(state).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    theme = data.get("theme") if isinstance(data, dict) else None
    return theme if isinstance(theme, str) and theme else None


def remember_theme(state: Path, theme: str) -> None:
    """Save the theme for the next start (atomically: a crash never leaves half a file)."""
    state.mkdir(parents=True, exist_ok=True)
    write_atomically(_path(state), json.dumps({"theme": theme}).encode())


def choose_theme(flag: str | None, settings: Any, state: Path, available: list[str]) -> str:
    """``--theme``, else an explicit ``ui.theme``, else the remembered one (if it still exists)."""
    if flag is not None:
        return flag
    if "theme" in settings.ui.model_fields_set:
        return str(settings.ui.theme)
    saved = remembered_theme(state)
    return saved if saved in available else str(settings.ui.theme)
