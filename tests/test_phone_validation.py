"""Phone numbers are ASCII ``+`` and 8–15 ASCII digits, at every entry point (issue 13, item 9).

A number with a fullwidth or other non-ASCII digit looks right on screen but can never match
the ``From`` Twilio sends, so the user would be an unknown caller forever."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from engine.phone import validate_phone
from xswarm_tui.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "phone",
    [
        "+1555555010\uff16",  # fullwidth 6
        "+\u0661\u0665\u0665\u0665\u0665\u0665\u0665\u0660\u0661\u0660",  # Arabic-Indic digits
        "\uff0b15555550106",  # fullwidth plus
        "+1234567",  # 7 digits: too short
        "+1234567890123456",  # 16 digits: too long
        "15555550106",
    ],
)
def test_users_add_refuses_anything_but_ascii_plus_and_8_to_15_ascii_digits(phone: str) -> None:
    result = runner.invoke(
        app, ["users", "add", "--name", "X", "--phone", phone, "--email", "x@example.com"], catch_exceptions=False
    )
    assert result.exit_code == 2 and "not E.164" in result.stderr
    assert runner.invoke(app, ["users", "list", "--json"]).stdout.strip() == "[]"


@pytest.mark.parametrize("phone", ["+12345678", "+123456789012345"])
def test_users_add_takes_8_and_15_digits(phone: str) -> None:
    result = runner.invoke(
        app, ["users", "add", "--name", "X", "--phone", phone, "--email", "x@example.com"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.stderr


@given(st.text(max_size=20))
def test_validate_phone_accepts_exactly_the_ascii_form(text: str) -> None:
    stripped = text.strip()
    ascii_form = (
        len(stripped) >= 9
        and stripped[0] == "+"
        and stripped[1] in "123456789"
        and all(c in "0123456789" for c in stripped[1:])
        and len(stripped) <= 16
    )
    try:
        assert validate_phone(text) == stripped and ascii_form
    except ValueError:
        assert not ascii_form
