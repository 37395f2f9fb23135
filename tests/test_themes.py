"""Theme files: loading, clear errors on bad files, and legibility at 256 colours."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.color import Color, ColorSystem

from themes import DOMAIN_KEYS, ThemeError, list_themes, load_theme


def _luminance(rgb: tuple[int, int, int]) -> float:
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: str, b: str, system: ColorSystem) -> float:
    """WCAG contrast of two colours as a terminal with ``system`` colours would show them."""

    def shown(hex_colour: str) -> tuple[int, int, int]:
        colour = Color.parse(hex_colour).downgrade(system)
        return tuple(colour.get_truecolor())  # type: ignore[return-value]

    la, lb = sorted((_luminance(shown(a)), _luminance(shown(b))), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_bundled_themes_load_with_personas() -> None:
    names = list_themes()
    assert {"xswarm", "hal-9000", "kitt", "glados"} <= set(names)
    for name in names:
        theme = load_theme(name)
        assert theme.name == name
        assert set(theme.variables) == set(DOMAIN_KEYS)
        assert theme.persona.voice in ("moshiko", "moshika")
        assert theme.persona.greeting and theme.persona.sms_tone and theme.persona.email_tone
    assert load_theme("hal-9000").persona.name == "HAL 9000"
    assert load_theme("glados").persona.voice == "moshika"


@pytest.mark.parametrize("system", [ColorSystem.EIGHT_BIT, ColorSystem.TRUECOLOR])
@pytest.mark.parametrize("name", ["xswarm", "hal-9000", "kitt", "glados"])
def test_theme_stays_legible(name: str, system: ColorSystem) -> None:
    theme = load_theme(name)
    bg = theme.palette["background"]
    assert _contrast(theme.palette["foreground"], bg, system) >= 7.0
    for surface in ("surface", "background"):
        for key in DOMAIN_KEYS:
            if key == "call-muted":  # deliberately dim, still readable
                assert _contrast(theme.variables[key], theme.palette[surface], system) >= 2.5
            else:
                assert _contrast(theme.variables[key], theme.palette[surface], system) >= 3.0, key


def test_unknown_theme_lists_the_valid_names() -> None:
    with pytest.raises(ThemeError, match="unknown theme 'nope'.*hal-9000"):
        load_theme("nope")


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = (Path(__file__).parent.parent / "themes" / "xswarm.toml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda t: t.replace('primary = "#00afd7"', 'primary = "cyan"'), "palette.primary"),
        (lambda t: t.replace('voice = "moshiko"', 'voice = "alto"'), "persona.voice"),
        (lambda t: t.replace('gpu = "#87d7ff"\n', ""), "colors.gpu"),
        (lambda t: t.replace("[persona]\n", "[persona]\nmood = 1\n"), "persona.mood"),
        (lambda t: t.replace('greeting = "Hi', 'greeting = "" # "Hi'), "persona.greeting"),
        (lambda t: t.replace("dark = true", 'dark = "yes"'), "dark"),
    ],
)
def test_bad_theme_file_names_file_and_key(xswarm_home: Path, edit, key: str) -> None:
    path = _write(xswarm_home / "config" / "themes", "broken", edit(GOOD))
    with pytest.raises(ThemeError) as info:
        load_theme("broken")
    assert str(path) in str(info.value)
    assert f"'{key}'" in str(info.value)


def test_bad_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "syntax", "title = \n")
    with pytest.raises(ThemeError, match="not valid TOML"):
        load_theme(str(path))


def test_user_theme_overrides_and_extends(xswarm_home: Path) -> None:
    folder = xswarm_home / "config" / "themes"
    _write(folder, "night-shift", GOOD.replace('name = "xSwarm"', 'name = "Night"'))
    _write(folder, "kitt", GOOD.replace('name = "xSwarm"', 'name = "My KITT"'))
    assert "night-shift" in list_themes()
    assert load_theme("night-shift").persona.name == "Night"
    assert load_theme("kitt").persona.name == "My KITT"


def test_a_greeting_names_a_theme_never_a_file(tmp_path: Path) -> None:
    """The theme comes from a stream parameter: a path in it falls back to the default theme."""
    from engine.persona import greeting

    planted = tmp_path / "evil.toml"
    planted.write_text('[persona]\ngreeting = "read from a planted file"\n')
    expected = greeting(None, "xswarm")
    assert greeting(str(planted), "xswarm") == expected
    assert greeting("../../etc/passwd", "xswarm") == expected
