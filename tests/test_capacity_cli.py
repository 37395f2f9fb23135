"""`xswarm capacity`: the issue's JSON contract, the context trade-off, and bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engine.doctor import capacity
from xswarm_tui.cli import app


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def test_json_lists_every_choice_with_the_contract_fields() -> None:
    result = invoke("capacity", "--gpu-memory-gib", "24", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and len(rows) == 9
    assert {(r["weights"], r["kv_cache"]) for r in rows} == {
        (w, k) for w in ("bf16", "int8", "int4") for k in ("bf16", "int8", "fp8")
    }
    for row in rows:
        assert {"weights", "kv_cache", "context", "calls", "mem_per_call_mib"} <= set(row)
        assert row["context"] == 3000
        if row["measured"]:
            assert row["calls"] >= 0 and row["mem_per_call_mib"] > 0 and "measured_on" in row
        else:
            assert row["calls"] is None and "gpu_capacity.sh" in row["note"]
    bf16 = next(r for r in rows if (r["weights"], r["kv_cache"]) == ("bf16", "bf16"))
    assert bf16["calls"] == capacity.calls_in(24 * capacity.GIB, "bf16", "bf16", 3000)


def test_a_shorter_context_trades_memory_for_calls() -> None:
    full = json.loads(invoke("capacity", "--gpu-memory-gib", "80", "--json").stdout)
    half = json.loads(invoke("capacity", "--gpu-memory-gib", "80", "--context", "1500", "--json").stdout)
    for a, b in zip(full, half, strict=True):
        if not a["measured"]:
            continue
        row = next(
            c for c in capacity.measured()["choices"] if (c["weights"], c["kv_cache"]) == (a["weights"], a["kv_cache"])
        )
        assert a["mem_per_call_mib"] - b["mem_per_call_mib"] == pytest.approx(row["kv_mib_per_call"] / 2, abs=0.2)
        assert b["calls"] > a["calls"] and b["context_s"] == 120.0


def test_text_table_says_what_the_context_means() -> None:
    result = invoke("capacity", "--gpu-memory-gib", "24", "--context", "750")
    assert result.exit_code == 0
    assert "remembers the last 60 s" in result.stdout and "4090 roofline" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--gpu-memory-gib", "0"], "--gpu-memory-gib must be"),
        (["--gpu-memory-gib", "24", "--context", "10"], "--context must be between 50 and 3000"),
        (["--gpu-memory-gib", "lots"], "valid number"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], words: str) -> None:
    result = invoke("capacity", *args)
    assert result.exit_code == 2 and words in result.output


def test_capacity_table_fits_the_sweep_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/capacity_table.py on a sweep report shaped as benchmarks/capacity.py writes it."""
    import benchmarks.capacity_table as table

    def run(batch: int, per_call: float, p99: float) -> dict:
        return {"batch": batch, "ok": True, "mem_per_call_mib": per_call, "step_ms_p99": p99}

    fixed, slope = 200.0, 800.0  # MiB: peak above the weights = 200 + B x 800
    report = {
        "benchmark": "capacity",
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "torch": "2.11",
        "context": 3000,
        "outside_allocator_gib": 0.6,
        "choices": [
            {
                "weights": "int8",
                "kv_cache": "int8",
                "weights_allocated_gib": 7.9,
                "kv_cache_mib_per_call": 761.7,
                "logits_rel_err": 0.01,
                "top1_agree": 0.9,
                "calibration": run(32, (fixed + 32 * slope) / 32, 30.0),
                "cards": {
                    "24gb": {"calls": 18, "tries": [run(18, (fixed + 18 * slope) / 18, 20.0)]},
                    "whole_gpu": {
                        "calls": 150,
                        "tries": [{"batch": 170, "ok": False}, run(150, (fixed + 150 * slope) / 150, 59.0)],
                    },
                },
            },
            {
                "weights": "bf16",
                "kv_cache": "bf16",
                "weights_allocated_gib": 14.7,
                "kv_cache_mib_per_call": 1500.0,
                "calibration": run(32, 1535.0, 33.0),
            },
            {"weights": "int4", "error": "RuntimeError: no"},
        ],
    }
    src = tmp_path / "sweep.json"
    src.write_text(json.dumps(report))
    dest = tmp_path / "capacity_measured.json"
    monkeypatch.setattr(table, "DEST", dest)
    assert table.main([str(src)]) == 0
    data = json.loads(dest.read_text())
    bf16, row = data["choices"]  # sorted: (bf16, bf16), (int8, int8)
    assert bf16["per_call_mib"] == 1535.0 and bf16["fixed_mib"] == 0.0
    assert row["fixed_mib"] == pytest.approx(fixed, abs=0.5) and row["per_call_mib"] == pytest.approx(slope, abs=0.1)
    assert row["step_ms_p99"] == [[18, 20.0], [32, 30.0], [150, 59.0]]
    assert row["cards"] == {"24gb": 18, "whole_gpu": 150} and data["outside_allocator_gib"] == 0.6
    report["choices"] = report["choices"][:1]
    src.write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="bf16"):
        table.main([str(src)])
