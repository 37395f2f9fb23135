"""The real MOSHI architecture with random weights, for tests and GPU benchmarks.

Every size runs the genuine moshi code paths (Mimi streaming codec, the LM with its 17 delayed
streams, the depformer, LMGen), only the weights are random, so step timings and memory are
the real ones for that size while no checkpoint is needed:

| size | Mimi | LM | use |
|---|---|---|---|
| ``tiny`` | 0.5 M params (verified tiny config) | dim 256, 2 layers (36 M) | tests, CPU benchmarks |
| ``small`` | the real Mimi (79 M) | dim 512, 4 layers (92 M) | a realistic codec on small hardware |
| ``7b`` | the real Mimi | the real 7.69 B LM | GPU benchmarks (build on CUDA) |

Configurations are derived from moshi's own defaults (``loaders._mimi_config`` and
``loaders._lm_kwargs``) with size overrides only; ``tests/test_moshi_synthetic.py`` fails if
those private defaults move. The tokenizer is a tiny SentencePiece model trained in memory
(ids 0 and 3 are the pads, as in MOSHI's), so forced text and transcripts work end to end.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from engine.models.base import Progress
from engine.models.moshi_torch import BatchedMoshi, Parts, default_slots
from engine.models.quantize import check_kind as check_weights
from engine.models.quantize import quantize_lm
from engine.models.registry import SYNTHETIC_SIZES as SIZES

TINY_MIMI_SEANET = {"n_filters": 8, "dimension": 64}
TINY_MIMI_QUANTIZER = {"dimension": 32, "input_dimension": 64, "output_dimension": 64}
TINY_MIMI_TRANSFORMER = {
    "d_model": 64,
    "num_heads": 2,
    "num_layers": 1,
    "dim_feedforward": 128,
    "input_dimension": 64,
    "output_dimensions": [64],
}
LM_OVERRIDES: dict[str, dict[str, Any]] = {
    "tiny": {
        "dim": 256,
        "num_heads": 4,
        "num_layers": 2,
        "depformer_dim": 128,
        "depformer_num_layers": 1,
        "depformer_dim_feedforward": 528,
    },
    "small": {
        "dim": 512,
        "num_heads": 8,
        "num_layers": 4,
        "depformer_dim": 256,
        "depformer_num_heads": 4,
        "depformer_num_layers": 2,
        "depformer_dim_feedforward": 1056,
    },
    "7b": {},
}


def mimi_config(size: str) -> dict[str, Any]:
    """Mimi config for a size: moshi's default, shrunk for ``tiny``."""
    from moshi.models import loaders

    cfg: dict[str, Any] = copy.deepcopy(loaders._mimi_config)
    if size == "tiny":
        cfg["seanet"].update(TINY_MIMI_SEANET)
        cfg["quantizer"].update(TINY_MIMI_QUANTIZER)
        cfg["transformer"].update(TINY_MIMI_TRANSFORMER)
    return cfg


def lm_config(size: str, context: int | None = None) -> dict[str, Any]:
    """Full LM kwargs for a size: moshi's 7B defaults plus the size overrides."""
    from moshi.models import loaders

    cfg = dict(loaders._lm_kwargs) | LM_OVERRIDES[size]
    if context is not None:
        cfg["context"] = context
    return cfg


def build_mimi(size: str, device: Any = "cpu") -> Any:
    """A random-weight Mimi whose codebooks are random too.

    moshi initialises codebooks to zeros (training fills them by k-means), which would map
    every sound to code 0 and make the LM deaf to its caller. Small random codewords (far
    smaller than the latents) make the nearest-codeword search follow the direction of each
    latent, so codes vary with the input at every RVQ level, as with real weights.
    """
    from moshi.models import loaders
    from moshi.quantization.core_vq import EuclideanCodebook

    mimi = loaders.get_mimi(None, mimi_config=mimi_config(size), device=device)
    with torch.no_grad():
        for module in mimi.modules():
            if isinstance(module, EuclideanCodebook):
                module.embedding_sum.copy_(torch.randn_like(module.embedding_sum) * 1e-3)
                module.cluster_usage.fill_(1.0)
                module._initialized.fill_(1.0)
                module._embedding = None  # type: ignore[assignment]  # drop the cached (zero) codebook
    return mimi


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}: choose one of {', '.join(SIZES)}")
    return size


class SyntheticMoshi(BatchedMoshi):
    """MOSHI's architecture with random weights (``synthetic:tiny|small|7b``)."""

    def __init__(
        self,
        slots: int,
        *,
        size: str = "tiny",
        device: str = "auto",
        dtype: str | None = None,
        context: int | None = None,
        seed: int | None = 0,
        greedy: bool = False,
        warmup_steps: int = 12,
        weights: str = "bf16",
        kv_cache: str = "bf16",
    ) -> None:
        super().__init__(slots, device=device, greedy=greedy, seed=seed, warmup_steps=warmup_steps, kv_cache=kv_cache)
        self.size = check_size(size)
        self.name = f"synthetic:{size}"
        self.dtype_name = dtype
        self.context = context
        self.weights = check_weights(weights)
        """LM weights after the random float build: bf16 (unquantized), int8 or int4."""

    @classmethod
    def from_settings(cls, settings: Any, *, variant: str | None, slots: int | None) -> SyntheticMoshi:
        m = settings.model
        return cls(
            slots or m.slots or default_slots(m.device),
            size=check_size(variant or "tiny"),
            device=m.device,
            context=m.context,
            seed=m.seed if m.seed is not None else 0,
            weights=m.weights,
            kv_cache=m.kv_cache,
        )

    def _torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype_name is None:
            # bf16 is the GPU serving dtype; on CPU float32 is both faster and exact.
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp32": torch.float32,
            "float32": torch.float32,
            "fp16": torch.float16,
        }[self.dtype_name]

    def _build(self, device: torch.device, progress: Progress | None) -> Parts:
        import sentencepiece
        from moshi.models import loaders

        from engine.models.tiny_checkpoint import tiny_tokenizer_proto

        if self.size == "7b" and device.type != "cuda":
            raise RuntimeError(
                "synthetic:7b is for GPU benchmarks: building it on a CPU takes minutes "
                "and steps take seconds; use synthetic:tiny here"
            )
        dtype = self._torch_dtype(device)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        if progress:
            progress(0.1, f"building {self.name} Mimi (random weights)")
        mimi = build_mimi(self.size, device)
        if progress:
            progress(0.4, f"building {self.name} LM on {device} (random weights)")
        # filename=None: built directly on `device` (never on CPU first for the 7B).
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config(self.size, self.context), device=device, dtype=dtype)
        lm_params = sum(p.numel() for p in lm.parameters())
        if self.weights != "bf16":
            if progress:
                progress(0.8, f"quantizing the LM to {self.weights}")
            quantize_lm(lm, self.weights)
        tokenizer = sentencepiece.SentencePieceProcessor(model_proto=tiny_tokenizer_proto())
        return Parts(
            mimi=mimi,
            lm=lm,
            tokenizer=tokenizer,
            facts={
                "spec": self.name,
                "lm_params": lm_params,
                "weights": self.weights,
                "mimi_params": sum(p.numel() for p in mimi.parameters()),
            },
        )
