"""Quantized MOSHI LM weights (int8, int4) with torchao; Mimi always stays in its float dtype.

Why torchao and not bitsandbytes (which moshi's own ``quantize=True`` path uses):

* torchao installs as one wheel with no dependencies beside torch, and its int8 weight-only
  path runs on the CPU as well as on CUDA, so the CPU tests exercise the very code a GPU runs;
  bitsandbytes' int8 matmul (``MatmulLtState``) is a CUDA path.
* it is PyTorch's own quantization library, kept in step with torch releases, and it has a
  real int4 kernel (tinygemm, ``_weight_int4pack_mm``, built into torch's CUDA build).

The choices, each applied to every ``nn.Linear`` of the LM (embeddings and norms keep their
dtype; they are under 5 % of the 7B's bytes):

| weights | torchao config | bytes per weight | runs on |
|---|---|---|---|
| ``bf16`` | none | 2 | CPU, CUDA |
| ``int8`` | ``Int8WeightOnlyConfig()``: per-output-channel symmetric int8 | 1 | CPU, CUDA |
| ``int4`` | ``Int4WeightOnlyConfig(group_size=128)``, tinygemm packing | 0.5 + scales | CUDA only |

Kyutai's published int8 checkpoints (``model.q8.safetensors`` in ``kyutai/moshiko-pytorch-q8``)
hold bitsandbytes' row-wise format: ``<name>.weight`` int8 codes and ``<name>.weight_scb``, the
row's absolute maximum, so ``weight ≈ codes × scb / 127``. ``load_lm`` turns those rows
straight into torchao ``Int8Tensor``s (no bitsandbytes, no float copy); a float checkpoint is
quantized one layer at a time while it loads, so the float model never sits whole on the GPU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

WEIGHT_KINDS = ("bf16", "int8", "int4")
INT4_GROUP_SIZE = 128
Q8_SCALE_SUFFIX = "_scb"
"""Suffix of the per-row absmax that bitsandbytes (and Kyutai's q8 checkpoints) store."""
_PER_STEP_PROJ = re.compile(r"(.+\.self_attn)\.(in|out)_projs\.(\d+)\.weight(_scb)?")


def check_kind(kind: str) -> str:
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"unknown weights {kind!r}: choose one of {', '.join(WEIGHT_KINDS)}")
    return kind


def _quiet_import() -> Any:
    """Import torchao without its warnings about optional GPU kernels reaching the terminal.

    torchao logs one "Failed to load" warning per prebuilt CUDA extension that does not match
    the installed torch (all of them on a CPU build), and torch one deprecation warning about
    how torchao registers an enum; neither concerns what is used here.
    """
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization as q  # type: ignore[import-untyped]
    except ImportError:
        raise RuntimeError(
            "quantized MOSHI weights need torchao: pip install torchao (it is in xswarm's moshi extra)"
        ) from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return q


def config_for(kind: str, device: torch.device) -> Any | None:
    """The torchao config for ``kind`` on ``device`` (None for bf16)."""
    check_kind(kind)
    if kind == "bf16":
        return None
    q = _quiet_import()
    if kind == "int8":
        return q.Int8WeightOnlyConfig()
    if device.type != "cuda":
        raise RuntimeError(
            "int4 weights need a CUDA GPU (torchao's int4 kernel is tinygemm, CUDA only); use int8 on this machine"
        )
    return q.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")


def quantize_lm(lm: torch.nn.Module, kind: str) -> None:
    """Quantize every Linear of ``lm`` in place (a no-op for bf16)."""
    config = config_for(kind, next(lm.parameters()).device)
    if config is None:
        return
    _quiet_import().quantize_(lm, config)


def _leaf_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold a (possibly quantized, tensor-subclass) tensor's data."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        yield t
        return
    names, _ = flatten()
    for name in names:
        inner = getattr(t, name)
        if isinstance(inner, torch.Tensor):
            yield from _leaf_tensors(inner)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers occupy (quantized codes and scales included)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        for leaf in _leaf_tensors(t):
            if id(leaf) not in seen:
                seen.add(id(leaf))
                total += leaf.numel() * leaf.element_size()
    return total


def int8_from_q8(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A torchao Int8Tensor from bitsandbytes row-wise codes and per-row absmax (``weight_scb``)."""
    q = _quiet_import()
    if codes.dtype != torch.int8 or codes.dim() != 2 or absmax.shape != codes.shape[:1]:
        raise ValueError(
            f"not a row-wise int8 weight: codes {tuple(codes.shape)} {codes.dtype}, scb {tuple(absmax.shape)}"
        )
    scale = (absmax.float() / 127.0).reshape(-1, 1)
    return q.Int8Tensor(codes, scale, [1, codes.shape[1]], dtype)


def q8_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``lm``'s state dict in Kyutai's q8 layout: every Linear weight as int8 codes + ``weight_scb``.

    The same row-wise absmax rounding as bitsandbytes' ``int8_vectorwise_quant``, and the
    attention projections under their published names (``in_proj_weight``, ``out_proj.weight``,
    the per-step copies stacked), as in Kyutai's files. Used to write int8 checkpoints (tests
    write a tiny one in the Hugging Face cache layout).
    """
    linears = {f"{name}.weight" for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    flat: dict[str, torch.Tensor] = {}
    for key, value in lm.state_dict().items():
        if key in linears:
            w = value.float()
            absmax = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            flat[key] = torch.round(w * (127.0 / absmax[:, None])).clamp(-127, 127).to(torch.int8)
            flat[key + Q8_SCALE_SUFFIX] = absmax
        else:
            flat[key] = value
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, list[torch.Tensor]] = {}
    for key, value in flat.items():
        match = _PER_STEP_PROJ.fullmatch(key)
        if match is None:
            out[key] = value.contiguous()
            continue
        prefix, kind, _, scb = match.groups()
        suffix = scb or ""
        published = f"{prefix}.in_proj_weight{suffix}" if kind == "in" else f"{prefix}.out_proj.weight{suffix}"
        stacks.setdefault(published, []).append(value)  # state_dict order: step 0, 1, …
    for key, parts in stacks.items():
        out[key] = torch.cat(parts, dim=0).contiguous()
    return out


def _map_attention_keys(lm: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Published names (``in_proj_weight``…) to module names, with moshi's own load hook."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    for name, module in lm.named_modules():
        if isinstance(module, StreamingMultiheadAttention):
            StreamingMultiheadAttention._load_hook(module, state, f"{name}.")


def load_lm(
    filename: Path,
    lm_kwargs: dict[str, Any],
    *,
    device: torch.device,
    weights: str,
    dtype: torch.dtype = torch.bfloat16,
) -> Any:
    """Build the LM from a safetensors checkpoint (float or q8) with ``weights`` precision.

    The model is built on ``meta`` and each tensor is read from the (memory-mapped) file onto
    ``device`` and quantized there on its own, so peak memory is the quantized model plus one
    float layer. A q8 checkpoint asked for as ``bf16`` is dequantized; as ``int4`` it is
    dequantized row by row and re-quantized.
    """
    from moshi.models import loaders
    from safetensors.torch import load_file

    check_kind(weights)
    config = config_for(weights, device)
    # moshi's own ``quantize`` flag would build bitsandbytes layers; torchao replaces them.
    kwargs = {k: v for k, v in lm_kwargs.items() if k != "quantize"}
    lm = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device="meta", dtype=dtype)
    lm.requires_grad_(False)
    state = load_file(str(filename), device="cpu")
    _map_attention_keys(lm, state)
    linears = {f"{name}.weight": m for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    ao = _quiet_import() if config is not None else None
    for key in list(state):
        if key.endswith(Q8_SCALE_SUFFIX):
            continue
        value = state[key]
        absmax = state.pop(key + Q8_SCALE_SUFFIX, None)
        if absmax is not None:
            if weights == "int8":
                state[key] = int8_from_q8(value.to(device), absmax.to(device), dtype)
                continue
            value = (value.to(device).float() * (absmax.to(device).float()[:, None] / 127.0)).to(dtype)
        elif value.dtype.is_floating_point:
            keep_f32 = key.startswith(("condition_provider.", "fuser."))
            value = value.to(device=device, dtype=torch.float32 if keep_f32 else dtype)
        else:
            value = value.to(device)
        if ao is not None and key in linears:
            linear = linears[key]
            linear.weight = torch.nn.Parameter(value, requires_grad=False)
            ao.quantize_(linear, config)
            value = linear.weight
        state[key] = value
    stray = [k for k in state if k.endswith(Q8_SCALE_SUFFIX)]
    if stray:
        raise ValueError(f"{filename}: int8 scales without weights: {', '.join(stray[:3])}")
    lm.load_state_dict(state, assign=True)
    return lm.eval()
