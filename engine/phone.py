"""E.164 phone numbers: the one pattern every input path checks against.

Its own module, importing nothing, so the settings (which load before the store) and the
store's user records can share it without an import cycle.
"""

from __future__ import annotations

import re

E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
"""ASCII ``+`` then 8 to 15 ASCII digits, the first not 0. Spelled ``[0-9]``, never ``\\d``,
which also matches fullwidth and other scripts' digits: such a number looks right on screen
but can never equal the ``From`` Twilio sends."""


def validate_phone(phone: str) -> str:
    """The number stripped, or ValueError saying what E.164 looks like."""
    phone = phone.strip()
    if not E164.fullmatch(phone):
        raise ValueError(f"phone {phone!r} is not E.164 (a '+', the country code, then digits, e.g. +14155550123)")
    return phone
