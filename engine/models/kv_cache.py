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
* reading dequantizes the whole ring of one layer to the model's dtype for
  ``scaled_dot_product_attention`` (moshi's attention code is unchanged). That is a transient
  buffer of one layer's bf16 cache, freed after the layer, and extra memory traffic per step:
  memory per call halves, the step itself gets no faster (see docs/performance.md).

fp8 is a storage format here: the cast to and from e4m3 runs on any CUDA GPU and on the CPU,
no fp8 tensor cores are needed. The depformer's tiny per-step caches and Mimi's are untouched.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from moshi.modules.transformer import (
    KVCacheResult,
    RingKVCache,
    StreamingMultiheadAttention,
    _MHAState,
)

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

    def complete(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> KVCacheResult:
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
        keys, values = self._dequantize(0), self._dequantize(1)

        # Positions exactly as RingKVCache.complete computes them.
        indexes = torch.arange(self.capacity, device=self.end_offset.device, dtype=torch.long)
        last_offset = self.end_offset.view(-1, 1) + T - 1
        delta = indexes - last_offset % self.capacity
        positions = torch.where(delta <= 0, last_offset + delta, last_offset + delta - self.capacity)
        if self.respect_exec_mask:
            self.end_offset[:] = torch.where(exec_mask, self.end_offset + T, self.end_offset)
        else:
            self.end_offset.add_(T)
        invalid = indexes >= self.end_offset.view(-1, 1)
        positions = torch.where(invalid, torch.full_like(positions, -1), positions)
        return KVCacheResult(keys, values, positions)


class CompactKVAttention(StreamingMultiheadAttention):
    """moshi's streaming attention whose KV ring is a ``CompactRingKVCache``."""

    kv_kind: str = "int8"

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


def install(lm: Any, kind: str) -> int:
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
            cast(CompactKVAttention, module).kv_kind = kind
        count += 1
    return count
