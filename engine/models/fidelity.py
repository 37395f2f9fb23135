"""How far a quantized LM's logits drift from its float reference, teacher-forced.

Both models see the same token sequence (seeded random input tokens in all 17 streams) and,
inside the depformer, the same previous tokens (the reference's greedy choices), so an early
disagreement cannot snowball: each step measures the quantization error alone. Per step and
slot the text logits and each of the ``dep_q`` audio codebooks' logits are compared.

* ``logits_rel_err``: median over (step, slot, stream) of ``‖test − ref‖₂ / ‖ref‖₂``;
* ``top1_agree``: fraction of (step, slot) whose greedy text token and all greedy audio tokens
  match the reference's; ``top1_agree_tokens`` counts each stream on its own.

With random weights these are a numerical proxy for the quantization error, not a measure of
speech quality: real checkpoints have outlier channels random ones lack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PROXY_NOTE = (
    "logits_rel_err and top1_agree compare against a float reference built from the same seed on "
    "the same inputs; with random weights they are a numerical proxy for quantization error, not speech quality"
)


@dataclass
class Logits:
    text: torch.Tensor
    """[steps, B, text_card], float32 on the CPU."""
    audio: torch.Tensor
    """[steps, B, dep_q, card], float32 on the CPU."""


def _inputs(lm: Any, steps: int, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, lm.card, (steps, batch, lm.num_codebooks, 1), generator=gen)
    seq[:, :, 0] = torch.randint(0, lm.text_card, (steps, batch, 1), generator=gen)
    return seq


@torch.no_grad()
def logits(lm: Any, steps: int, batch: int, *, seed: int = 0, forced: Logits | None = None) -> Logits:
    """Teacher-forced logits of ``steps`` streaming steps; ``forced`` supplies the previous
    tokens inside the depformer (the reference's argmax), else the model's own argmax."""
    dev = next(lm.parameters()).device
    seq = _inputs(lm, steps, batch, seed).to(dev)
    texts, audios = [], []
    with lm.streaming(batch):
        for t in range(steps):
            out, text_logits = lm.forward_text(seq[t])
            text_logits = text_logits[:, 0, 0].float()
            prev = (forced.text[t].to(dev) if forced else text_logits).argmax(-1)
            step_audio = []
            with lm.depformer.streaming(batch):
                for cb in range(lm.dep_q):
                    cb_logits = lm.forward_depformer(cb, prev[:, None, None], out)[:, 0, 0].float()
                    step_audio.append(cb_logits.cpu())
                    prev = (forced.audio[t, :, cb].to(dev) if forced else cb_logits).argmax(-1)
            texts.append(text_logits.cpu())
            audios.append(torch.stack(step_audio, dim=1))
    return Logits(torch.stack(texts), torch.stack(audios))


def compare(ref: Logits, test: Logits) -> dict[str, float]:
    """``logits_rel_err``, ``top1_agree``, ``top1_agree_tokens`` of ``test`` against ``ref``."""

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)

    errs = torch.cat([rel(ref.text, test.text).flatten(), rel(ref.audio, test.audio).flatten()])
    text_ok = ref.text.argmax(-1) == test.text.argmax(-1)  # [steps, B]
    audio_ok = ref.audio.argmax(-1) == test.audio.argmax(-1)  # [steps, B, dep_q]
    all_ok = text_ok & audio_ok.all(dim=-1)
    tokens = torch.cat([text_ok.flatten(), audio_ok.flatten()])
    return {
        "logits_rel_err": round(float(errs.median()), 6),
        "top1_agree": round(float(all_ok.float().mean()), 4),
        "top1_agree_tokens": round(float(tokens.float().mean()), 4),
    }
