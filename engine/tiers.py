"""The one tier vocabulary: what each subscription tier may use per month.

Stripe prices map onto these names (``settings.stripe.price_tiers``), users carry one of them,
and usage checks read the allowances from here, so a tier is never spelled twice.
``None`` means unlimited.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    name: str
    voice_minutes: int | None
    """Minutes of calls per month."""
    sms: int | None
    """SMS replies per month."""
    email: int | None
    """Email replies per month."""


TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        Tier("free", voice_minutes=10, sms=20, email=20),
        Tier("personal", voice_minutes=300, sms=500, email=500),
        Tier("professional", voice_minutes=2000, sms=5000, email=5000),
        Tier("enterprise", voice_minutes=None, sms=None, email=None),
        Tier("admin", voice_minutes=None, sms=None, email=None),
    )
}


def tier(name: str) -> Tier:
    """The tier called ``name``; a ``ValueError`` that lists the valid names otherwise."""
    try:
        return TIERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tier {name!r}; valid tiers: {', '.join(TIERS)}") from None
