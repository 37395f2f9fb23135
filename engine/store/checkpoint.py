"""Keep an embedded file's write-ahead log checkpointed from a thread of its own.

Why: SQLite's automatic checkpoint runs inside the COMMIT that takes the log past 1,000
pages, on the committing thread. For us that is the writer thread, so every few hundred
group commits one of them also copied megabytes back into the database file and synced
it, and every caller waiting on that batch (a webhook's 2xx, a call's end row) waited too.
The writer turns automatic checkpoints off and this thread runs PASSIVE checkpoints
instead: they never block the writer or readers, and they copy whatever the log holds
while the writer goes on committing (docs/performance.md, "Database").

A remote database (sqld, Turso) manages its own log; this is for the local file only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("xswarm.store")

INTERVAL_S = 0.25
"""How often the log is checked: often enough that one pass copies tens of MB at most under
a full webhook load."""


class Checkpointer:
    """A daemon thread that checkpoints the log whenever the writer has committed since the
    last pass, and once more when stopped. Always PASSIVE: a TRUNCATE at the end of a short
    CLI command would wait for the runtime's readers and writer in another process; the last
    connection to close removes the log anyway."""

    def __init__(
        self, connect: Callable[[], Any], commits: Callable[[], int], *, interval_s: float = INTERVAL_S
    ) -> None:
        """``connect`` opens a connection of its own; ``commits`` reads the writer's commit count."""
        self._connect = connect
        self._commits = commits
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="xswarm-db-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after a final checkpoint (call once the writer has stopped)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        try:
            conn = self._connect()
        except Exception as exc:  # the writer reports an unusable database; just stand aside
            log.warning("checkpointer cannot open the database: %s", exc)
            return
        seen = self._commits()
        try:
            while not self._stop.wait(self._interval_s):
                now = self._commits()
                if now != seen:
                    seen = now
                    self._checkpoint(conn)
            self._checkpoint(conn)
        finally:
            conn.close()

    def _checkpoint(self, conn: Any) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception as exc:  # a failing checkpoint only delays the next one
            log.warning("WAL checkpoint failed: %s", exc)
        else:
            self.passes += 1
