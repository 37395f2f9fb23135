"""``used_call_tokens``: the nonces of call tokens already used, until they expire.

The bridge burns a token in memory first (admission must not wait for a commit) and records
it here; a restarted node loads the rows still valid, and a nonce that another node (or an
earlier run) recorded first makes the insert a no-op, which the bridge treats as a replay.
"""

from __future__ import annotations

import concurrent.futures
import time

from engine.store.db import Database


def record(db: Database, nonce: str, expires: int, now: float | None = None) -> concurrent.futures.Future[list[int]]:
    """Insert the nonce (dropping expired rows in the same transaction); the future's second
    rowcount is 0 when the nonce was already there."""
    moment = int(now if now is not None else time.time())
    return db.submit_script(
        [
            ("DELETE FROM used_call_tokens WHERE expires_at < ?", (moment,)),
            ("INSERT OR IGNORE INTO used_call_tokens (nonce, expires_at) VALUES (?, ?)", (nonce, expires)),
        ]
    )


def unexpired(db: Database, now: float | None = None) -> list[tuple[str, int]]:
    """``(nonce, expires)`` of every token used and not yet expired."""
    moment = int(now if now is not None else time.time())
    rows = db.query("SELECT nonce, expires_at FROM used_call_tokens WHERE expires_at >= ?", (moment,))
    return [(str(nonce), int(expires)) for nonce, expires in rows]
