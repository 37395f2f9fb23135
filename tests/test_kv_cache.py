"""The compact (int8 / fp8) KV cache: the same ring as moshi's, smaller storage, per-slot reset.

The ring itself is compared step by step against moshi's ``RingKVCache`` (positions must be
identical, values within the format's rounding), then the whole batched engine is run with
each compact kind to show that slots stay isolated and that a reused slot starts fresh.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from moshi.modules.transformer import RingKVCache

from engine.models import kv_cache
from engine.models.base import FRAME_SIZE, StepInput
from engine.models.synthetic import SyntheticMoshi

torch.set_num_threads(1)
B, H, D, CAP = 3, 2, 16, 8
TOLERANCE = {"int8": 0.01, "fp8": 0.07}
"""Relative error of one dequantized vector: int8 rounds to 1/254 of the vector's maximum;
e4m3 keeps 3 mantissa bits (up to 1/16 relative per element)."""


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_compact_ring_matches_moshi_ring_through_wraps_masks_and_resets(kind: str) -> None:
    torch.manual_seed(0)
    ref = RingKVCache(B, H, D, CAP, device=torch.device("cpu"), dtype=torch.float32)
    new = kv_cache.CompactRingKVCache(B, H, D, CAP, kind=kind, device=torch.device("cpu"), dtype=torch.float32)
    rng = np.random.default_rng(1)
    for step in range(30):  # the ring (capacity 8) wraps several times
        if step in (11, 23):
            reset = torch.tensor([False, True, step == 23])
            ref.reset(reset)
            new.reset(reset)
        mask = torch.from_numpy(rng.random(B) > 0.25)
        k = torch.randn(B, H, 1, D) * 3
        v = torch.randn(B, H, 1, D)
        a = ref.complete(k, v, mask)
        b = new.complete(k, v, mask)
        torch.testing.assert_close(b.positions, a.positions, rtol=0, atol=0)
        valid = a.positions >= 0  # [B, CAP]: what attention may read
        for got, want in ((b.keys, a.keys), (b.values, a.values)):
            g, w = got.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid]
            err = (g - w).norm(dim=-1) / w.norm(dim=-1)
            assert err.max() < TOLERANCE[kind], (step, float(err.max()))
        assert torch.equal(new.end_offset, ref.end_offset)


def test_storage_is_one_byte_per_value_plus_per_token_scales() -> None:
    cache = kv_cache.CompactRingKVCache(B, H, 128, CAP, kind="int8", device=torch.device("cpu"), dtype=torch.bfloat16)
    assert cache.data.dtype == torch.int8 and cache.data.shape == (2, B, H, CAP, 128)
    assert cache.scales.shape == (2, B, H, CAP)
    stored = cache.data.numel() * 1 + cache.scales.numel() * 2
    bf16 = 2 * B * H * CAP * 128 * 2
    assert stored / bf16 == pytest.approx(kv_cache.bytes_per_element("int8", 128) / 2)
    fp8 = kv_cache.CompactRingKVCache(B, H, 128, CAP, kind="fp8", device=torch.device("cpu"), dtype=torch.bfloat16)
    assert fp8.data.dtype == torch.uint8  # e4m3 bits, viewed as float8_e4m3fn on read
    with pytest.raises(ValueError, match="bf16"):
        kv_cache.CompactRingKVCache(B, H, D, CAP, kind="bf16", device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="int8, fp8"):
        kv_cache.check_kind("int4")


# -- the batched engine with a compact cache ---------------------------------------------------

SLOTS, CONTEXT = 3, 16
"""A 16-step window: the rings wrap within the runs below."""


@pytest.fixture(scope="module")
def parts():
    model = SyntheticMoshi(SLOTS, size="tiny", device="cpu", greedy=True, warmup_steps=0, context=CONTEXT)
    model.load()
    built = model.parts
    model.close()
    return built


def _run(parts, kind: str, calls: list[tuple[int, int, int, int]], steps: int) -> list[list[str | bytes]]:
    """calls: (slot, from, to, seed). Returns per step, per slot: pcm bytes + text (or '')."""
    model = SyntheticMoshi(
        SLOTS, size="tiny", device="cpu", greedy=True, warmup_steps=0, context=CONTEXT, kv_cache=kind
    )
    model.load(parts=parts)
    try:
        audio = {
            seed: (np.random.default_rng(seed).standard_normal((steps, FRAME_SIZE)) * 0.1).astype(np.float32)
            for _, _, _, seed in calls
        }
        out = []
        for t in range(steps):
            batch = StepInput.silence(SLOTS)
            for slot, start, stop, seed in calls:
                if start <= t < stop:
                    batch.active[slot] = True
                    batch.admitted[slot] = t == start
                    batch.pcm[slot] = audio[seed][t - start]
            o = model.step(batch)
            out.append([o.pcm[s].tobytes() + o.text[s].encode() if o.ready[s] else b"" for s in range(SLOTS)])
        installed = [
            type(m._streaming_state.kv_cache).__name__
            for m in model.parts.lm.transformer.modules()
            if getattr(m, "_streaming_state", None) is not None and hasattr(m._streaming_state, "kv_cache")
        ]
        assert installed and set(installed) == {"CompactRingKVCache"}
        return out
    finally:
        model.close()


@pytest.fixture(params=["dequantize", "fused"])
def path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both attention paths: moshi's attention on the dequantized ring, and attend_compact
    (run eagerly here: compiling it on this CPU would take a minute per shape)."""
    from moshi.utils.compile import no_compile

    monkeypatch.setattr(kv_cache.CompactKVAttention, "fused", request.param == "fused")
    with no_compile():
        yield request.param


def test_fused_attention_equals_attention_on_the_dequantized_ring() -> None:
    from moshi.models import loaders
    from moshi.utils.compile import no_compile

    from engine.models import fidelity
    from engine.models.synthetic import lm_config

    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config("tiny", 16), dtype=torch.float32)
    ref = fidelity.logits(lm, 24, 2)  # 24 steps: the 16-step window wraps
    with no_compile():
        for kind in ("int8", "fp8"):
            kv_cache.install(lm, kind, fused=False)
            plain = fidelity.logits(lm, 24, 2, forced=ref)
            kv_cache.install(lm, kind, fused=True)
            fused = fidelity.logits(lm, 24, 2, forced=ref)
            assert fidelity.compare(plain, fused)["logits_rel_err"] < 1e-5
            assert fidelity.compare(ref, fused)["logits_rel_err"] < (0.02 if kind == "int8" else 0.08)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_a_reused_slot_starts_like_a_fresh_call(parts, kind: str, path: str) -> None:
    """Per-slot reset still works: a call admitted into a slot that held a 30-step call
    (its ring wrapped) produces exactly what the same call produces in a fresh slot."""
    fresh = _run(parts, kind, [(1, 0, 12, 5)], 12)
    reused = _run(parts, kind, [(1, 0, 30, 4), (0, 0, 42, 6), (1, 30, 42, 5)], 42)
    assert [row[1] for row in fresh] == [row[1] for row in reused[30:]]
    assert any(row[1] for row in fresh), "no output at all would prove nothing"


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_other_calls_joining_and_leaving_do_not_disturb_a_slot(parts, kind: str, path: str) -> None:
    alone = _run(parts, kind, [(0, 0, 24, 10)], 24)
    busy = _run(parts, kind, [(0, 0, 24, 10), (1, 5, 13, 11), (2, 9, 24, 12)], 24)
    assert [row[0] for row in alone] == [row[0] for row in busy]


def test_install_switches_the_temporal_transformer_only_and_back(parts) -> None:
    lm = parts.lm
    layers = len(lm.transformer.layers)
    assert kv_cache.install(lm, "fp8") == layers
    kinds = {type(m).__name__ for m in lm.transformer.modules() if "Attention" in type(m).__name__}
    assert kinds == {"CompactKVAttention"}
    assert not any(type(m).__name__ == "CompactKVAttention" for m in lm.depformer.modules())
    assert kv_cache.install(lm, "bf16") == layers
    assert not any(type(m).__name__ == "CompactKVAttention" for m in lm.modules())
