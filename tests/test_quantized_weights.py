"""Quantized LM weights (torchao): quantizing in place, Kyutai's q8 checkpoint layout loaded
from the Hugging Face cache without bitsandbytes, a bf16 checkpoint quantized on load, and the
engine benchmark's new fields (the issue's CPU contract)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from engine.config import Settings
from engine.models import fidelity, quantize, registry
from engine.models.base import StepInput
from engine.models.synthetic import lm_config
from engine.models.tiny_checkpoint import write_tiny_checkpoint

torch.set_num_threads(1)
Q8_REPO = "kyutai/moshiko-pytorch-q8"
BF16_REPO = "kyutai/moshiko-pytorch-bf16"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    # Loading must be fully local: any attempt to reach a host fails loudly.
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("network")))
    return path


def _tiny_lm(dtype: torch.dtype = torch.bfloat16):
    from moshi.models import loaders

    torch.manual_seed(0)
    return loaders.get_moshi_lm(None, lm_kwargs=lm_config("tiny"), dtype=dtype)


def _linear_weights(lm) -> list[torch.Tensor]:
    return [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]


def test_int8_quantizes_every_linear_and_shrinks_the_lm() -> None:
    lm = _tiny_lm()
    before = quantize.tensor_bytes(lm)
    linear_bytes = sum(w.numel() * 2 for w in _linear_weights(lm))
    rows = sum(w.shape[0] for w in _linear_weights(lm))
    reference = fidelity.logits(lm, 6, 2)
    quantize.quantize_lm(lm, "int8")
    assert {type(w).__name__ for w in _linear_weights(lm)} == {"Int8Tensor"}
    after = quantize.tensor_bytes(lm)
    # Linear weights go from 2 bytes to 1 (+ one float32 scale per row); the rest is untouched.
    assert before - after == linear_bytes // 2 - rows * 5  # float32 scale + int8 zero point per row
    result = fidelity.compare(reference, fidelity.logits(lm, 6, 2, forced=reference))
    assert result["logits_rel_err"] < 0.05 and result["top1_agree_tokens"] > 0.85


def test_int4_needs_cuda_and_says_so() -> None:
    with pytest.raises(RuntimeError, match="int4 weights need a CUDA GPU"):
        quantize.quantize_lm(_tiny_lm(), "int4")
    with pytest.raises(ValueError, match="bf16, int8, int4"):
        quantize.check_kind("fp4")


def test_q8_layout_is_kyutais(tmp_path: Path) -> None:
    lm = _tiny_lm()
    state = quantize.q8_state_dict(lm)
    # Published names for the attention projections, the per-step depformer copies stacked.
    assert "transformer.layers.0.self_attn.in_proj_weight" in state
    assert "transformer.layers.0.self_attn.in_proj_weight_scb" in state
    steps = len(lm.depformer.layers[0].self_attn.in_projs)
    one = lm.depformer.layers[0].self_attn.in_projs[0].weight
    assert state["depformer.layers.0.self_attn.in_proj_weight"].shape == (steps * one.shape[0], one.shape[1])
    codes = state["text_linear.weight"]
    absmax = state["text_linear.weight_scb"]
    assert codes.dtype == torch.int8 and absmax.dtype == torch.float32
    dequant = codes.float() * absmax[:, None] / 127
    torch.testing.assert_close(dequant, lm.text_linear.weight.float(), atol=float(absmax.max()) / 127, rtol=0)


def _load(weights: str, kv: str = "bf16"):
    settings = Settings(
        model={"name": "moshi", "device": "cpu", "slots": 2, "context": 64, "weights": weights, "kv_cache": kv}
    )
    model = registry.create("moshi", settings)
    model.load()
    return model


def _steps(model, n: int = 4) -> list[bool]:
    ready = []
    for t in range(n):
        batch = StepInput.silence(2)
        batch.active[:] = True
        batch.admitted[:] = t == 0
        ready.append(bool(model.step(batch).ready.all()))
    return ready


def test_q8_checkpoint_in_the_hf_cache_loads_straight_into_int8(cache: Path) -> None:
    snap = write_tiny_checkpoint(cache, Q8_REPO, q8=True)
    stored = load_file(str(snap / "model.q8.safetensors"))
    model = _load("int8", kv="int8")
    try:
        facts = model.describe()
        assert facts["repo"] == Q8_REPO and facts["checkpoint"] == "q8" and facts["weights"] == "int8"
        assert facts["kv_cache"] == "int8" and facts["context"] == 64
        weight = model.parts.lm.text_linear.weight
        assert type(weight).__name__ == "Int8Tensor"
        # The codes are the file's, bit for bit: no float round trip on the way in.
        assert torch.equal(weight.qdata, stored["text_linear.weight"])
        torch.testing.assert_close(weight.scale.flatten(), stored["text_linear.weight_scb"] / 127)
        attn = model.parts.lm.transformer.layers[0].self_attn.in_projs[0].weight
        assert torch.equal(attn.qdata, stored["transformer.layers.0.self_attn.in_proj_weight"])
        assert _steps(model) == [False, True, True, True]
    finally:
        model.close()


def test_bf16_checkpoint_is_quantized_on_load_when_no_q8_is_cached(cache: Path) -> None:
    write_tiny_checkpoint(cache, BF16_REPO)
    model = _load("int8")
    try:
        assert model.describe()["repo"] == BF16_REPO and model.describe()["checkpoint"] == "bf16"
        assert {type(w).__name__ for w in _linear_weights(model.parts.lm)} == {"Int8Tensor"}
        assert _steps(model) == [False, True, True, True]
    finally:
        model.close()


def test_q8_checkpoint_serves_bf16_by_dequantizing(cache: Path) -> None:
    write_tiny_checkpoint(cache, Q8_REPO, q8=True)
    model = _load("bf16")
    try:
        weight = model.parts.lm.text_linear.weight
        assert type(weight) is torch.nn.Parameter and weight.dtype == torch.bfloat16
        assert model.describe()["checkpoint"] == "q8"
        assert _steps(model, 2) == [False, True]
    finally:
        model.close()


def test_int4_on_a_cpu_fails_before_reading_the_checkpoint(cache: Path) -> None:
    write_tiny_checkpoint(cache, BF16_REPO)
    model = registry.create("moshi", Settings(model={"name": "moshi", "device": "cpu", "slots": 1, "weights": "int4"}))
    with pytest.raises(RuntimeError, match="CUDA"):
        model.load()


def test_settings_accept_the_old_dtype_name_and_refuse_unknown_choices() -> None:
    assert Settings(model={"dtype": "int8"}).model.weights == "int8"
    assert Settings(model={"weights": "int4", "kv_cache": "fp8"}).model.kv_cache == "fp8"
    with pytest.raises(ValueError):
        Settings(model={"kv_cache": "int4"})
    with pytest.raises(ValueError):
        Settings(model={"weights": "fp8"})


def test_bench_engine_contract_on_cpu() -> None:
    """The issue's contract, run as an operator would."""
    from xswarm_tui.cli import app

    result = CliRunner().invoke(
        app,
        "bench engine --model synthetic:tiny --weights int8 --kv-cache int8 --batch 1,4 --steps 20 --json".split(),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["weights"] == "int8" and report["kv_cache"] == "int8"
    assert "proxy" in report["fidelity"]["note"] and "RSS" in report["mem_per_call"]
    assert [r["batch"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["mem_per_call_mib"] is not None and row["weights_gib"] > 0
        assert 0 < row["logits_rel_err"] < 0.1 and 0 <= row["top1_agree"] <= 1
        assert row["kv_cache_mib_per_call"] == pytest.approx(
            2 * 2 * 256 * 3000 * (1 + 4 / 64) / 2**20, rel=0.01
        )  # tiny LM: 2 layers, dim 256, head_dim 64, context 3000; int8 + float32 scales (CPU dtype)


def test_bench_engine_refuses_bad_choices() -> None:
    from xswarm_tui.cli import app

    for args, words in (("--weights fp4", "--weights must be"), ("--kv-cache int4", "--kv-cache must be")):
        result = CliRunner().invoke(app, ["bench", "engine", *args.split()])
        assert result.exit_code == 2 and words in result.output


def test_auto_prefers_the_checkpoint_of_the_asked_precision(cache: Path) -> None:
    from engine.models import checkpoints

    write_tiny_checkpoint(cache, BF16_REPO)
    q8 = Settings(model={"weights": "int8"})
    assert checkpoints.find_local(q8).repo == BF16_REPO  # no q8 cached: bf16, quantized on load
    write_tiny_checkpoint(cache, Q8_REPO, q8=True)
    assert checkpoints.find_local(q8).repo == Q8_REPO
    assert checkpoints.find_local(Settings(model={"weights": "bf16"})).repo == BF16_REPO
    assert checkpoints.mlx_repos("moshika", "int4") == ["kyutai/moshika-mlx-q4", "kyutai/moshika-mlx-q8"]
    assert checkpoints.mlx_repos("moshiko", "int8")[0] == "kyutai/moshiko-mlx-q8"
