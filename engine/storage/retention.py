"""Retention for objects filed under a ``YYYY-MM-DD`` folder (recordings, log archives).

The day in the key, not the object's upload time, decides: a recording spooled for a week
during an outage still ages from the day of its call.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from engine.storage.base import ObjectStore


def _day(key: str) -> datetime | None:
    for segment in key.split("/"):
        try:
            return datetime.strptime(segment, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def prune_dated(store: ObjectStore, prefix: str, retention_days: int, *, now: float | None = None) -> list[str]:
    """Delete objects under ``prefix`` whose day is more than ``retention_days`` before today
    (UTC); keys without a day are left alone. Returns the deleted keys."""
    today = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    cutoff = today.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() - retention_days * 86400
    deleted = []
    for info in store.list(prefix):
        day = _day(info.key[len(prefix) :])
        if day is not None and day.timestamp() < cutoff:
            store.delete(info.key)
            deleted.append(info.key)
    return deleted
