"""A database whose ``-shm`` file cannot be used (issue 13, item 8).

Before: the server ended with SIGBUS (exit 135) and not a line in the log. SQLite maps the
``-shm`` file into memory; when it shrinks under a running process the next access is a bus
error, which no Python code can catch. So a node refuses to start when the file is not
usable, and a fault while running leaves its traceback in the log (and a webhooks child that
dies of it is restarted by the node, which logs its exit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.store.db import Database, StoreError, Target

ROOT = Path(__file__).resolve().parents[1]


def test_a_shm_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "xswarm.db"
    Database(Target(str(path))).start().close()
    (tmp_path / "xswarm.db-shm").unlink(missing_ok=True)
    (tmp_path / "xswarm.db-shm").mkdir()  # not a file SQLite can map
    with pytest.raises(StoreError) as info:
        Database(Target(str(path))).start()
    message = str(info.value)
    assert "xswarm.db-shm" in message and "read-write" in message and "\n" not in message


def test_serve_refuses_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "XSWARM_HOME": str(tmp_path)}
    data = tmp_path / "data"
    data.mkdir()
    Database(Target(str(data / "xswarm.db"))).start().close()
    (data / "xswarm.db-shm").unlink(missing_ok=True)
    (data / "xswarm.db-shm").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "xswarm_tui.cli", "serve", "--model", "echo", "--bridge-port", "0",
         "--supervisor-port", "0", "--webhooks-port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "xswarm.db-shm" in done.stderr, done.stderr


def test_a_bus_error_while_running_leaves_a_log_line(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, sys
        from engine.logging_setup import configure
        from engine.store.db import Database, Target
        configure()
        db = Database(Target(sys.argv[1])).start()
        db.write("CREATE TABLE t (x)")
        os.truncate(sys.argv[1] + "-shm", 0)  # the mapped file shrinks under us
        db.write("INSERT INTO t VALUES (1)")
        """
    )
    env = {**os.environ, "XSWARM_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.db")], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == -signal.SIGBUS
    log = (tmp_path / "state" / "logs" / "xswarm.log").read_text()
    assert "Fatal Python error: Bus error" in log and "_write_loop" in log, log[-2000:]
