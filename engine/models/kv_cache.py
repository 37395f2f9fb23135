"""A compact KV cache for the LM's temporal transformer: int8 or fp8 (e4m3) with per-token scales.

The KV cache is what each call costs: 2 (K, V) × 32 layers × 4096 × 2 bytes = 512 KiB per step
of context in bf16, 1.46 GiB per call at the trained window of 3000 steps. Storing K and V in
one byte halves that (plus 1/64 for the scales at head_dim 128).

How: ``install(lm, kind)`` turns the temporal transformer's self-attention modules into
``CompactKVAttention``, whose streaming state holds a ``CompactRingKVCache`` instead of moshi's
``RingKVCache``. Same ring, same slots, same positions (it subclasses the ring and keeps its
``end_offset`` bookkeeping, so ``reset_streaming(mask)`` still resets one slot at a time and
``set_exec_mask`` still freezes a slot); only the storage differs:

* each new K or V vector (one head, one token) is scaled by its own absolute maximum, so an
  outlier token costs precision only to itself: int8 stores ``round(x / (amax / 127))``,
  fp8 stores ``x / (amax / 448)`` as ``float8_e4m3fn`` (448 is e4m3's largest value);
* reading, in the engine's case (one step at a time, CUDA, torch.compile on), goes through
  ``attend_compact``: the two attention reductions read the codes and scales directly, so a
  step reads one byte per cached value instead of two. Otherwise (CPU, compile off, several
  steps at once) the ring of one layer is dequantized to the model's dtype and moshi's own
  attention runs on it: a transient bf16 buffer of one layer, and more memory traffic than
  bf16 (measured by ``benchmarks/gpu_capacity.sh``, which times both paths).

fp8 is a storage format here: the cast to and from e4m3 runs on any CUDA GPU and on the CPU,
no fp8 tensor cores are needed. The depformer's tiny per-step caches and Mimi's are untouched.
"""

from __future__ import annotations

import os
from typing import Any, cast

import torch
from einops import rearrange
from moshi.modules.transformer import (
    KVCacheResult,
    RingKVCache,
    StreamingMultiheadAttention,
    _MHAState,
    apply_weights_per_step,
)
from moshi.utils import compile as moshi_compile
from moshi.utils.compile import torch_compile_lazy


def compile_disabled() -> bool:
    """moshi's switches: ``NO_TORCH_COMPILE=1`` or inside ``no_compile()``."""
    return bool(os.environ.get("NO_TORCH_COMPILE")) or moshi_compile._compile_disabled


KV_KINDS = ("bf16", "int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}


def check_kind(kind: str) -> str:
    if kind not in KV_KINDS:
        raise ValueError(f"unknown KV cache {kind!r}: choose one of {', '.join(KV_KINDS)}")
    return kind


def bytes_per_element(kind: str, head_dim: int) -> float:
    """Stored bytes per cached K or V element, scales included (bf16: 2)."""
    check_kind(kind)
    return 2.0 if kind == "bf16" else 1.0 + 2.0 / head_dim


class CompactRingKVCache(RingKVCache):
    """moshi's ring KV cache with one-byte storage and per-(slot, head, token) scales."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        dim_per_head: int,
        capacity: int,
        *,
        kind: str,
        respect_exec_mask: bool = True,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        # Not RingKVCache.__init__: that would allocate the full-width ring first.
        if check_kind(kind) == "bf16":
            raise ValueError("a bf16 KV cache is moshi's own RingKVCache")
        self.kind = kind
        self.capacity = capacity
        self.dtype = dtype
        self.qmax = _QMAX[kind]
        self.respect_exec_mask = respect_exec_mask
        storage = torch.int8 if kind == "int8" else torch.uint8  # fp8 bits, viewed on read
        self.data = torch.zeros((2, batch_size, num_heads, capacity, dim_per_head), device=device, dtype=storage)
        self.scales = torch.zeros((2, batch_size, num_heads, capacity), device=device, dtype=dtype)
        self.end_offset = torch.zeros(batch_size if respect_exec_mask else 1, device=device, dtype=torch.long)

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, T, D] -> (codes in storage dtype, scales [B, H, T] in the model dtype)."""
        xf = x.float()
        scale = (xf.abs().amax(dim=-1) / self.qmax).clamp_min(torch.finfo(torch.float32).tiny).to(self.dtype)
        scaled = xf / scale.float()[..., None]
        if self.kind == "int8":
            codes = scaled.round_().clamp_(-127, 127).to(torch.int8)
        else:
            codes = scaled.clamp_(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        return codes, scale

    def _dequantize(self, i: int) -> torch.Tensor:
        codes = self.data[i]
        if self.kind == "fp8":
            codes = codes.view(torch.float8_e4m3fn)
        return codes.to(self.dtype) * self.scales[i][..., None]

    def store(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> torch.Tensor:
        """Write the new K and V, advance the slots that execute; return the ring's positions
        ([B, capacity], -1 where nothing valid is stored), exactly as ``RingKVCache.complete``."""
        assert k.shape[:-1] == v.shape[:-1], (k.shape, v.shape)
        B, H, T, D = k.shape
        assert T > 0
        steps = torch.arange(T, device=self.end_offset.device, dtype=self.end_offset.dtype)
        write = (steps + self.end_offset.view(-1, 1)) % self.capacity
        for i, x in enumerate((k, v)):
            codes, scale = self._quantize(x)
            if self.respect_exec_mask:
                self.data[i].scatter_(2, write.view(B, 1, T, 1).expand(-1, H, T, D), codes)
                self.scales[i].scatter_(2, write.view(B, 1, T).expand(-1, H, T), scale)
            else:
                self.data[i].index_copy_(2, write[0], codes)
                self.scales[i].index_copy_(2, write[0], scale)
        indexes = torch.arange(self.capacity, device=self.end_offset.device, dtype=torch.long)
        last_offset = self.end_offset.view(-1, 1) + T - 1
        delta = indexes - last_offset % self.capacity
        positions = torch.where(delta <= 0, last_offset + delta, last_offset + delta - self.capacity)
        if self.respect_exec_mask:
            self.end_offset[:] = torch.where(exec_mask, self.end_offset + T, self.end_offset)
        else:
            self.end_offset.add_(T)
        invalid = indexes >= self.end_offset.view(-1, 1)
        return torch.where(invalid, torch.full_like(positions, -1), positions)

    def complete(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> KVCacheResult:
        """``RingKVCache.complete``: store, then the whole ring dequantized for attention."""
        positions = self.store(k, v, exec_mask)
        return KVCacheResult(self._dequantize(0), self._dequantize(1), positions)


@torch_compile_lazy
def attend_compact(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    allowed: torch.Tensor,
    fp8: bool,
) -> torch.Tensor:
    """Attention of one query step over the compact ring, reading the codes directly.

    q [B, H, 1, D]; codes [B, H, T, D]; scales [B, H, T]; allowed [B, T]. Per-token scales
    factor out of both products: ``q·k_t = s_t (q·codes_t)`` and ``Σ p_t v_t = Σ (p_t s_t)
    codes_t``. Compiled (moshi's lazy ``torch.compile``), the casts fuse into the two
    reductions, so each code byte is read once and no dequantized copy is written.
    """
    if fp8:
        k_codes = k_codes.view(torch.float8_e4m3fn)
        v_codes = v_codes.view(torch.float8_e4m3fn)
    scale = q.shape[-1] ** -0.5
    scores = (q.float() * k_codes.float()).sum(-1) * (k_scales.float() * scale)  # [B, H, T]
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0) * v_scales.float()  # no valid step: zeros
    out = (probs[..., None] * v_codes.float()).sum(dim=2, keepdim=True)  # [B, H, 1, D]
    return out.to(q.dtype)


class CompactKVAttention(StreamingMultiheadAttention):
    """moshi's streaming attention whose KV ring is a ``CompactRingKVCache``.

    One streaming step at a time on CUDA with torch.compile available (the engine's case),
    attention reads the codes directly (``attend_compact``); otherwise it runs moshi's own
    forward on the dequantized ring. ``fused`` forces either path (tests, benchmarks).
    """

    kv_kind: str = "int8"
    fused: bool | None = None

    def _use_fused(self, query: torch.Tensor) -> bool:
        state = self._streaming_state
        if state is None or query.shape[1] != 1 or self.kv_repeat != 1 or self.context is None:
            return False
        if self.fused is not None:
            return self.fused
        if not query.is_cuda or compile_disabled():
            return False
        # Triton reads e4m3 only on Ada/Hopper and later; older GPUs cast eagerly (dequantize path).
        return self.kv_kind != "fp8" or torch.cuda.get_device_capability(query.device) >= (8, 9)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if not self._use_fused(query):
            return super().forward(query, key, value)
        # moshi's forward for a causal self-attention step, the attention itself replaced.
        state = self._streaming_state
        assert state is not None and isinstance(state.kv_cache, CompactRingKVCache)
        projected = apply_weights_per_step(self.in_projs, self.weights_per_step_schedule, query, state.offset_cpu)
        q, k, v = rearrange(projected, "b t (p h d) -> p b h t d", p=3, h=self.num_heads)
        if self.rope:
            q, k = self.rope(q, k, state.offset, time_before_heads=False)
        cache = state.kv_cache
        pos_k = cache.store(k, v, state.exec_mask)
        context = self.context
        assert context is not None
        delta = state.offset.view(-1, 1) - pos_k
        allowed = (pos_k >= 0) & (delta >= 0) & (delta < context)
        x = attend_compact(
            q, cache.data[0], cache.scales[0], cache.data[1], cache.scales[1], allowed, cache.kind == "fp8"
        )
        x = rearrange(x, "b h t d -> b t (h d)")
        x = apply_weights_per_step(self.out_projs, self.weights_per_step_schedule, x, state.offset_cpu)
        state.offset[:] = torch.where(state.exec_mask, state.offset + 1, state.offset)
        state.offset_cpu += 1
        return x

    def _init_streaming_state(self, batch_size: int) -> _MHAState:
        weight = cast(torch.nn.Linear, self.in_projs[0]).weight
        device, dtype = weight.device, weight.dtype
        assert self.context is not None
        cache = CompactRingKVCache(
            batch_size,
            self.num_heads // self.kv_repeat,
            self.embed_dim // self.num_heads,
            self.context,
            kind=self.kv_kind,
            device=device,
            dtype=dtype,
        )
        return _MHAState(
            batch_size,
            device,
            cache,
            offset=torch.zeros(batch_size, device=device, dtype=torch.long),
            offset_cpu=0,
        )


def install(lm: Any, kind: str, *, fused: bool | None = None) -> int:
    """Give the LM's temporal-transformer attention a ``kind`` KV cache; return how many layers.

    Call before entering streaming mode (the cache is allocated then). ``bf16`` restores
    moshi's own cache, so one set of weights can be benchmarked with each kind in turn.
    """
    check_kind(kind)
    count = 0
    for module in lm.transformer.modules():
        if not isinstance(module, StreamingMultiheadAttention):
            continue
        if module.cross_attention or module.weights_per_step or module.context is None:
            continue
        if kind == "bf16":
            module.__class__ = StreamingMultiheadAttention
        else:
            module.__class__ = CompactKVAttention
            compact = cast(CompactKVAttention, module)
            compact.kv_kind = kind
            if fused is not None:
                compact.fused = fused
            else:
                compact.__dict__.pop("fused", None)  # the class default: automatic
        count += 1
    return count
