"""The persona's greeting at call start: the first words a caller hears come from the theme.

A call's theme is the user's (the voice webhook passes it in the signed stream parameters),
else the node's ``ui.theme``. The greeting is forced into the AI's text stream exactly as a
supervisor's whisper is (``CallSession.whisper``): MOSHI speaks forced text, and every model
reports it as the AI's transcript (the echo model only does that, it has no voice of its own).
A theme that cannot be loaded costs the greeting, never the call.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from themes import ThemeError, load_theme

log = logging.getLogger("xswarm.persona")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""A theme name, never a path: an untrusted stream parameter must not pick a file to read."""


@functools.lru_cache(maxsize=64)
def greeting(theme: str | None, default: str) -> str | None:
    """The greeting of ``theme`` (else ``default``), or None when there is none to say.

    Read once per name per process: calls start on the loop that carries the tick."""
    name = theme if theme and _NAME.fullmatch(theme) else default
    try:
        text = load_theme(name).persona.greeting.strip()
    except (ThemeError, OSError) as exc:
        log.warning("no greeting: theme %r cannot be loaded: %s", name, exc)
        return None
    return text or None


def greet(session: Any, default_theme: str) -> None:
    """Queue the persona's greeting as the first forced text of a call that just went live."""
    text = greeting(session.theme, default_theme)
    if text is not None:
        session.whisper(text)
