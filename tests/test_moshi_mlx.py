"""MlxMoshi (moshi_mlx + mlx[cpu]) in the main environment, where `.ci/setup --dev` installs
moshi-mlx with --no-deps (its pins clash with xswarm's, its model code does not). The check
runs in a subprocess (tests/mlx/check_mlx.py): MLX is not thread-safe and keeps global state,
so it stays out of the test process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("moshi_mlx") is None, reason="moshi-mlx not installed (bash .ci/setup --dev)"
)


@pytest.fixture(scope="module")
def facts() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mlx" / "check_mlx.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_slots_start_after_the_acoustic_delay_and_stay_isolated(facts: dict) -> None:
    assert facts["name"] == "moshi-mlx:tiny"
    assert facts["ready0"][0] is False and all(facts["ready0"][1:])
    # slot 1 lives for steps 3..8: inside the acoustic delay at its first step, then ready
    assert facts["ready1"] == [False] * 4 + [True] * 5 + [False] * 3
    assert facts["slot0_same"], "slot 0 changed when another call joined, was whispered to and taken over"


def test_whisper_and_takeover_act_on_their_slot(facts: dict) -> None:
    assert "hello" in facts["text1"] and "hello" not in facts["text0"]
    assert facts["operator_heard"]
    # operator codes of the call's steps 3 and 4 sit in that slot's own stream
    assert facts["codes_step3"] == facts["op_step6"]
    assert facts["codes_step4"] == facts["op_step7"]
