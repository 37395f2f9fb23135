"""Background work yields to live calls: a lower CPU and I/O priority (``engine.priority``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import json, os, psutil\n"
    "from engine.priority import BACKGROUND_NICE, run_in_background\n"
    "before = os.getpriority(os.PRIO_PROCESS, 0)\n"
    "run_in_background()\n"
    "io = psutil.Process().ionice()\n"
    "print(json.dumps([before, os.getpriority(os.PRIO_PROCESS, 0), int(io.ioclass), BACKGROUND_NICE]))\n"
)


@pytest.mark.skipif(sys.platform != "linux", reason="the I/O class is Linux's")
def test_a_background_process_runs_below_the_calls() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after, ioclass, step = json.loads(out.stdout)
    assert after == min(19, before + step)
    assert ioclass == int(psutil.IOPRIO_CLASS_IDLE)


def test_backup_create_runs_in_the_background(background_priority: list[str]) -> None:
    from typer.testing import CliRunner

    from engine.config import load_settings
    from engine.store.migrations import open_database
    from xswarm_tui.commands.backup import app

    open_database(load_settings()).close()
    result = CliRunner().invoke(app, ["create"])
    assert result.exit_code == 0, result.output
    assert background_priority == ["background"]
