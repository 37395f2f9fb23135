"""A writer killed with SIGKILL mid-batch loses no acknowledged row; the database reopens cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.store import migrations
from engine.store.db import Database, Target

# The child writes feed rows as fast as it can and reports each row's number on its own line
# the moment that row's future resolves (i.e. after its commit), then never stops by itself.
_CHILD = textwrap.dedent(
    """
    import os, sys
    from engine.store import feed, migrations
    from engine.store.db import Database, Target

    location, token, report = sys.argv[1], sys.argv[2] or None, sys.argv[3]
    db = Database(Target(location, token), batch_max_rows=500, batch_max_wait_ms=20).start()
    migrations.migrate(db)
    out = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def acknowledged(number):
        def done(future):
            if future.exception() is None:
                os.write(out, b"%d\\n" % number)
        return done

    number = 0
    while True:
        for _ in range(200):
            feed.append(db, type="Durability", summary=f"row-{number}").add_done_callback(acknowledged(number))
            number += 1
    """
)


@pytest.mark.parametrize("where", ["file", "sqld"])
def test_sigkill_mid_batch_loses_no_acknowledged_row(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "file":
        target = Target(str(tmp_path / "durable.db"))
    else:
        target = request.getfixturevalue("sqld").target()
    report = tmp_path / "acknowledged.txt"
    report.touch()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, target.location, target.auth_token or "", str(report)], env=env
    )
    try:
        deadline = time.monotonic() + 60
        while report.read_text().count("\n") < 3000:  # several batches committed, more in flight
            assert child.poll() is None, "writer process died on its own"
            assert time.monotonic() < deadline, "writer acknowledged too few rows"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    acknowledged = {int(line) for line in report.read_text().split()}

    with Database(target) as db:
        assert db.query("PRAGMA integrity_check") == [("ok",)]
        assert migrations.migrate(db) == []
        stored = {
            int(s.removeprefix("row-")) for (s,) in db.query("SELECT summary FROM events WHERE type = 'Durability'")
        }
        assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged rows lost"
        db.write("INSERT INTO events (at, type, summary) VALUES (?, ?, ?)", (0, "after", "reopened"))
        assert db.query("SELECT COUNT(*) FROM events WHERE type = 'after'") == [(1,)]
