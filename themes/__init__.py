"""Theme files: the console's palette and the AI's persona, one TOML file per theme.

Why one file for both: an operator picks "HAL 9000" once and expects the console colours, the
greeting a caller hears, the model voice and the tone of SMS/email replies to agree. The TUI
turns ``palette`` + ``colors`` into a Textual theme; the runtime reads ``persona.greeting`` and
``persona.voice``; the webhooks read ``persona.sms_tone``/``email_tone``. This module is pure
Python (no Textual) so the headless runtime and the webhooks can use it.

Lookup order: ``<config>/themes/<name>.toml`` (the operator's own files) before the themes
shipped here, so a user file can override a bundled one by name. A bad file raises
``ThemeError`` naming the file and the key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

Voice = Literal["moshiko", "moshika"]

PALETTE_KEYS = (
    "primary",
    "secondary",
    "accent",
    "warning",
    "error",
    "success",
    "foreground",
    "background",
    "surface",
    "panel",
)
"""Textual's base colours; ``primary`` is required, the rest derive from it when absent."""

DOMAIN_KEYS = (
    "call-live",
    "call-operator",
    "call-muted",
    "latency-good",
    "latency-warn",
    "latency-bad",
    "level-caller",
    "level-ai",
    "gpu",
    "event-money",
    "event-message",
    "event-error",
)
"""Domain colours the stylesheet uses as ``$call-live`` and friends; every theme sets all."""

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
DEFAULT_THEME = "xswarm"


class ThemeError(ValueError):
    """A theme file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Persona:
    """Who the AI is on the phone and in replies."""

    name: str
    greeting: str
    """First words the AI says on a call (forced into its text stream)."""
    voice: Voice
    """Which released MOSHI voice speaks: Moshiko (male) or Moshika (female)."""
    sms_tone: str
    """Style instruction for SMS replies, handed to the LLM."""
    email_tone: str
    """Style instruction for email replies."""


@dataclass(frozen=True)
class Theme:
    """One theme file, checked."""

    name: str
    """File stem, e.g. ``hal-9000``; also the Textual theme name."""
    title: str
    dark: bool
    palette: dict[str, str]
    """Textual base colours (``primary`` … ``panel``) as ``#rrggbb``."""
    variables: dict[str, str]
    """Domain colours, keyed as in ``DOMAIN_KEYS``."""
    persona: Persona
    source: Path = field(compare=False)


def _user_dir() -> Path:
    from engine.paths import resolve_paths  # resolved now: tests move XSWARM_HOME

    return resolve_paths().config / "themes"


def _bundled() -> dict[str, Path]:
    root = resources.files(__name__)
    return {Path(entry.name).stem: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".toml")}


def _files() -> dict[str, Path]:
    found = _bundled()
    user = _user_dir()
    if user.is_dir():
        found.update({p.stem: p for p in user.glob("*.toml")})
    return found


def list_themes() -> list[str]:
    """Every theme name available, bundled and the operator's own, sorted."""
    return sorted(_files())


def load_theme(name: str = DEFAULT_THEME) -> Theme:
    """Load and check one theme by name (file stem) or by path to a ``.toml`` file."""
    if name.endswith(".toml"):
        return parse_theme_file(Path(name))
    path = _files().get(name)
    if path is None:
        raise ThemeError(f"unknown theme {name!r}; available: {', '.join(list_themes())}")
    return parse_theme_file(path)


def parse_theme_file(path: Path) -> Theme:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ThemeError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ThemeError(f"{path}: cannot read: {exc}") from None
    return _build(path, data)


def _build(path: Path, data: dict[str, Any]) -> Theme:
    def fail(key: str, why: str) -> ThemeError:
        return ThemeError(f"{path}: key '{key}': {why}")

    name = path.stem
    if not _NAME.match(name):
        raise ThemeError(f"{path}: file name must be lower-case letters, digits and '-'")
    _no_unknown(data, {"title", "dark", "palette", "colors", "persona"}, "", fail)

    title = data.get("title", name)
    if not isinstance(title, str) or not title.strip():
        raise fail("title", "must be a non-empty string")
    dark = data.get("dark", True)
    if not isinstance(dark, bool):
        raise fail("dark", "must be true or false")

    palette = _colours(data, "palette", PALETTE_KEYS, required=("primary",), fail=fail)
    variables = _colours(data, "colors", DOMAIN_KEYS, required=DOMAIN_KEYS, fail=fail)

    raw = data.get("persona")
    if not isinstance(raw, dict):
        raise fail("persona", "missing [persona] table")
    _no_unknown(raw, {"name", "greeting", "voice", "sms_tone", "email_tone"}, "persona.", fail)
    texts: dict[str, str] = {}
    for key in ("name", "greeting", "sms_tone", "email_tone"):
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise fail(f"persona.{key}", "must be a non-empty string")
        texts[key] = value.strip()
    voice = raw.get("voice")
    if voice not in ("moshiko", "moshika"):
        raise fail("persona.voice", f'must be "moshiko" or "moshika", not {voice!r}')
    persona = Persona(voice=voice, **texts)
    return Theme(name, title.strip(), dark, palette, variables, persona, path)


def _colours(
    data: dict[str, Any], table: str, allowed: tuple[str, ...], *, required: tuple[str, ...], fail: Any
) -> dict[str, str]:
    raw = data.get(table)
    if not isinstance(raw, dict):
        raise fail(table, f"missing [{table}] table")
    _no_unknown(raw, set(allowed), f"{table}.", fail)
    out: dict[str, str] = {}
    for key in allowed:
        value = raw.get(key)
        if value is None:
            if key in required:
                raise fail(f"{table}.{key}", "missing")
            continue
        if not isinstance(value, str) or not _HEX.match(value):
            raise fail(f"{table}.{key}", f'must be a colour like "#1a2b3c", not {value!r}')
        out[key] = value.lower()
    return out


def _no_unknown(raw: dict[str, Any], allowed: set[str], prefix: str, fail: Any) -> None:
    for key in raw:
        if key not in allowed:
            raise fail(f"{prefix}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
