"""Our synthetic sizes are derived from moshi's private defaults (loaders._mimi_config,
loaders._lm_kwargs). If a moshi upgrade moves them, these fail loudly instead of the
synthetic models silently stopping to be "the real architecture"."""

from __future__ import annotations

import pytest
import torch

from engine.models import synthetic

torch.set_num_threads(1)


def test_moshi_7b_defaults_are_what_we_built_on() -> None:
    from moshi.models import loaders

    lm = loaders._lm_kwargs
    assert (lm["dim"], lm["num_layers"], lm["num_heads"], lm["context"]) == (4096, 32, 32, 3000)
    assert (lm["n_q"], lm["dep_q"], lm["card"], lm["text_card"]) == (16, 8, 2048, 32000)
    assert lm["delays"] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert (lm["depformer_dim"], lm["depformer_num_layers"], lm["existing_text_padding_id"]) == (1024, 6, 3)
    assert lm["norm"] == "rms_norm_f32" and lm["gating"] == "silu" and lm["depformer_weights_per_step"]
    mimi = loaders._mimi_config
    assert (mimi["sample_rate"], mimi["frame_rate"]) == (24000, 12.5)
    assert mimi["seanet"]["dimension"] == 512 and mimi["seanet"]["ratios"] == [8, 6, 5, 4]
    assert (mimi["quantizer"]["n_q"], mimi["quantizer"]["bins"]) == (32, 2048)
    for key in synthetic.TINY_MIMI_SEANET:
        assert key in mimi["seanet"]
    for key in synthetic.TINY_MIMI_TRANSFORMER:
        assert key in mimi["transformer"]
    for size in synthetic.SIZES:
        assert set(synthetic.LM_OVERRIDES[size]) <= set(lm), f"{size} overrides a key moshi no longer has"


def test_sizes_keep_the_real_structure() -> None:
    for size in synthetic.SIZES:
        cfg = synthetic.lm_config(size)
        assert (cfg["n_q"], cfg["dep_q"], cfg["card"], cfg["text_card"]) == (16, 8, 2048, 32000)
        assert cfg["delays"][1:9] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert synthetic.lm_config("7b", context=750)["context"] == 750
    assert synthetic.lm_config("7b")["dim"] == 4096


def test_tiny_mimi_frames_like_the_real_one() -> None:
    mimi = synthetic.build_mimi("tiny")
    assert (mimi.frame_size, mimi.sample_rate, mimi.num_codebooks) == (1920, 24000, 8)
    with torch.no_grad(), mimi.streaming(2):
        frames = [mimi.encode(torch.randn(2, 1, 1920) * torch.tensor([0.05, 0.5])[:, None, None]) for _ in range(4)]
        assert all(c.shape == (2, 8, 1) for c in frames)
        codes = torch.cat(frames, dim=-1)
        assert not torch.equal(codes[0], codes[1]), "random codebooks must keep encoding input-dependent"
        assert mimi.decode(frames[-1]).shape == (2, 1, 1920)


def test_unknown_size_and_7b_on_cpu_are_refused() -> None:
    with pytest.raises(ValueError, match="tiny"):
        synthetic.SyntheticMoshi(1, size="huge")
    model = synthetic.SyntheticMoshi(1, size="7b", device="cpu")
    with pytest.raises(RuntimeError, match="GPU"):
        model.load()
