"""E.164 phone numbers: the one pattern every input path checks against.

Its own module, importing nothing, so the settings (which load before the store) and the
store's user records can share it without an import cycle.
"""

from __future__ import annotations

import re

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def validate_phone(phone: str) -> str:
    """The number stripped, or ValueError saying what E.164 looks like."""
    phone = phone.strip()
    if not E164.match(phone):
        raise ValueError(f"phone {phone!r} is not E.164 (a '+', the country code, then digits, e.g. +14155550123)")
    return phone
