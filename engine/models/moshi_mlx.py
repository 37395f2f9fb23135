"""MOSHI on Apple Silicon through moshi_mlx (MLX), for Macs where PyTorch MPS cannot hold it.

moshi_mlx's ``LmGen`` keeps ONE step counter and a fixed token buffer for its whole batch and
has no per-row reset or exec mask, so calls that join and leave at different times cannot
share one MLX batch. Each slot therefore owns its own generator state (an ``LmGen``, the LM's
KV caches, a Mimi codec state) and the slots are stepped one after another inside the same
``step`` call; the weights are loaded once and shared by every slot (MLX arrays are
immutable, so sharing is free). This is the honest shape for a Mac: a handful of calls.

Controls, per slot: forced text (whisper, greeting) goes through a sampler that returns the
queued token instead of sampling, so the depformer is conditioned on it exactly as with
PyTorch's text hook; takeover writes the operator's Mimi codes into the slot's generated
audio stream at the positions the model's per-codebook delays give them.

``moshi-mlx:tiny`` builds random weights of the tiny sizes (tests on Linux with ``mlx[cpu]``).
moshi-mlx lives in xswarm's own environment (``.ci/setup`` installs it with --no-deps: its
pins clash with xswarm's, its model code does not). Kyutai's MLX checkpoints come as q8
(``model.q8.safetensors``, 8 bits, groups of 64) or q4 (``model.q4.safetensors``, 4 bits,
groups of 32); ``model.weights = "int4"`` prefers the q4 repository. MLX is not
thread-safe: like every model, this one runs on the single inference thread only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from engine.models.base import FRAME_SIZE, Progress, StepInput, StepOutput, VoiceModel

log = logging.getLogger("xswarm.models")

MAX_CALL_STEPS = 22_500
"""moshi_mlx keeps every token of a call in a fixed buffer: 22,500 steps = 30 minutes."""
TEXT_PAD_ID = 3
TEXT_EPAD_ID = 0
STEPS_PER_FORCED_WORD = 4


def tiny_configs() -> tuple[Any, Any]:
    """LM and Mimi configs at the sizes of ``synthetic:tiny`` (random weights, for tests)."""
    from moshi_mlx import models
    from moshi_mlx.models.mimi import mimi_202407

    lm = models.config_v0_1()
    lm = dataclasses.replace(
        lm,
        transformer=dataclasses.replace(lm.transformer, d_model=256, num_heads=4, num_layers=2, dim_feedforward=1024),
        depformer=dataclasses.replace(
            lm.depformer,
            transformer=dataclasses.replace(
                lm.depformer.transformer, d_model=128, num_heads=16, num_layers=1, dim_feedforward=528
            ),
        ),
    )
    mimi = mimi_202407(8)
    mimi = dataclasses.replace(
        mimi,
        seanet=dataclasses.replace(mimi.seanet, nfilters=8, dimension=64),
        transformer=dataclasses.replace(mimi.transformer, d_model=64, num_heads=2, num_layers=1, dim_feedforward=128),
        quantizer_dim=32,
    )
    return lm, mimi


class _ForcingSampler:
    """Samples normally unless a token is queued for this slot, then returns that token."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.queue: deque[int] = deque()
        self.force: int | None = None

    def __call__(self, logits: Any) -> tuple[Any, Any]:
        import mlx.core as mx

        token, logprobs = self.base(logits)
        if self.force is not None:
            token = mx.full(token.shape, self.force, dtype=mx.int32)
        return token, logprobs


@dataclasses.dataclass
class _Slot:
    cache: Any
    gen: Any
    mimi: Any
    sampler: _ForcingSampler
    op_mimi: Any | None = None
    op_codes: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    """Operator codes by the step index they belong to (the last two steps are enough)."""


class MlxMoshi(VoiceModel):
    """MOSHI through moshi_mlx: one generator state per slot, weights shared."""

    name = "moshi-mlx"

    def __init__(
        self,
        slots: int,
        *,
        size: str | None = None,
        weights: Path | None = None,
        quantized: int | None = 8,
        greedy: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(slots)
        if size not in (None, "tiny"):
            raise ValueError("moshi-mlx sizes: tiny (random weights) or real weights")
        self.size = size
        self.weights = weights
        self.quantized = quantized
        self.greedy = greedy
        self.seed = seed
        self.last_step_ms: float | None = None
        self.step_times_ms: deque[float] = deque(maxlen=512)
        if size == "tiny":
            self.name = "moshi-mlx:tiny"

    @classmethod
    def from_settings(cls, settings: Any, *, variant: str | None, slots: int | None) -> MlxMoshi:
        from engine.models import checkpoints

        m = settings.model
        if variant == "tiny":
            return cls(slots or m.slots or 2, size="tiny", seed=m.seed or 0)
        repos = checkpoints.mlx_repos(m.variant, m.weights)
        folder = m.weights_path or next(
            (snap for snap in map(checkpoints.snapshot_dir, repos) if snap is not None), None
        )
        if folder is None:
            raise FileNotFoundError(
                f"no MLX weights for {m.variant} in {checkpoints.hub_cache_dir()}; run `xswarm models pull {repos[0]}`"
            )
        return cls(slots or m.slots or 2, weights=Path(folder), seed=m.seed or 0)

    # -- building -----------------------------------------------------------------------
    def load(self, progress: Progress | None = None) -> None:
        try:
            import mlx.core as mx
            import mlx.nn as nn
            from moshi_mlx import models, utils
        except ImportError as exc:
            raise RuntimeError(
                f"the moshi-mlx model needs moshi_mlx and mlx ({exc}): on Apple Silicon `bash .ci/setup` "
                "installs them (on Linux `bash .ci/setup --dev`, with mlx[cpu])"
            ) from None
        import sentencepiece

        mx.random.seed(self.seed)
        if self.size == "tiny":
            from engine.models.tiny_checkpoint import tiny_tokenizer_proto

            lm_cfg, mimi_cfg = tiny_configs()
            self.tokenizer = sentencepiece.SentencePieceProcessor(model_proto=tiny_tokenizer_proto())
        else:
            from moshi_mlx.models.mimi import mimi_202407

            lm_cfg, mimi_cfg = models.config_v0_1(), mimi_202407(8)
            self.tokenizer = sentencepiece.SentencePieceProcessor(str(self._file("tokenizer_spm_32k_3.model")))
        if progress:
            progress(0.1, f"building {self.name}")
        self.lm = models.Lm(lm_cfg)
        self.lm.set_dtype(mx.bfloat16)
        self.mimi_cfg = mimi_cfg
        mimi = models.mimi.Mimi(mimi_cfg)
        if self.size == "tiny":
            _random_codebooks(mimi)
        else:
            # Kyutai's MLX files and how they were quantized (moshi_mlx.run_inference).
            for name, bits, group in (("model.q8.safetensors", 8, 64), ("model.q4.safetensors", 4, 32)):
                if self.weights is not None and (self.weights / name).is_file():
                    nn.quantize(self.lm, bits=bits, group_size=group)
                    break
            else:
                name = "model.safetensors"
            self.lm.load_weights(str(self._file(name)), strict=True)
            mimi.load_pytorch_weights(str(self._file("tokenizer-e351c8d8-checkpoint125.safetensors")), strict=True)
        self._mimi_params = mimi.parameters()
        self._mimi0 = mimi
        temp = 0.0 if self.greedy else None
        self._text_base = utils.Sampler(temp=temp) if temp is not None else utils.Sampler(temp=0.7, top_k=25)
        self._audio_base = utils.Sampler(temp=temp) if temp is not None else utils.Sampler(temp=0.8, top_k=250)
        self._pieces = [
            ""
            if i in (TEXT_EPAD_ID, TEXT_PAD_ID) or self.tokenizer.is_control(i) or self.tokenizer.is_unknown(i)
            else self.tokenizer.id_to_piece(i).replace("▁", " ")
            for i in range(self.tokenizer.vocab_size())
        ]
        self._slots: list[_Slot | None] = [None] * self.slots
        self._queues: list[deque[int]] = [deque() for _ in range(self.slots)]
        if progress:
            progress(1.0, "model ready")

    def _file(self, name: str) -> Path:
        if self.weights is None or not (self.weights / name).is_file():
            raise FileNotFoundError(f"{name} not found in {self.weights}")
        return self.weights / name

    def _new_mimi(self) -> Any:
        from moshi_mlx import models

        if self._mimi0 is not None:  # the first slot takes the instance that was built
            mimi, self._mimi0 = self._mimi0, None
            return mimi
        from moshi_mlx.modules.quantization import EuclideanCodebook

        mimi = models.mimi.Mimi(self.mimi_cfg)
        mimi.update(self._mimi_params)
        for _, module in mimi.named_modules():  # a nested update skips their derived codebook
            if isinstance(module, EuclideanCodebook):
                module.update_in_place()
        return mimi

    def _open(self, slot: int) -> _Slot:
        """Fresh per-call state for a slot (what a PyTorch reset_streaming(mask) does)."""
        from moshi_mlx import models

        old = self._slots[slot]
        mimi = old.mimi if old is not None else self._new_mimi()
        mimi.reset_all()
        sampler = _ForcingSampler(self._text_base)
        cache = self.lm.transformer.make_rot_cache()
        self.lm.transformer_cache = cache
        gen = models.LmGen(self.lm, max_steps=MAX_CALL_STEPS, text_sampler=sampler, audio_sampler=self._audio_base)
        state = _Slot(cache=cache, gen=gen, mimi=mimi, sampler=sampler, op_mimi=old.op_mimi if old else None)
        if state.op_mimi is not None:
            state.op_mimi.reset_all()
        self._slots[slot] = state
        self._queues[slot].clear()
        return state

    # -- controls --------------------------------------------------------------------------
    def forced_tokens(self, text: str) -> list[int]:
        """Same schedule as the PyTorch engine: EPAD, the word's pieces, pads to 4 steps."""
        out: list[int] = []
        for word in text.split():
            ids = [i for i in self.tokenizer.encode(word) if i not in (TEXT_EPAD_ID, TEXT_PAD_ID)]
            if ids:
                out += [TEXT_EPAD_ID, *ids] + [TEXT_PAD_ID] * max(0, STEPS_PER_FORCED_WORD - len(ids) - 1)
        return out

    # -- the step --------------------------------------------------------------------------
    def step(self, batch: StepInput) -> StepOutput:
        import mlx.core as mx

        t0 = time.perf_counter()
        B = self.slots
        if batch.pcm.shape != (B, FRAME_SIZE):
            raise ValueError(f"pcm must be [{B}, {FRAME_SIZE}], got {list(batch.pcm.shape)}")
        active = np.asarray(batch.active, bool)
        takeover = np.zeros(B, bool) if batch.takeover is None else np.asarray(batch.takeover, bool) & active
        if takeover.any() and batch.operator_pcm is None:
            raise ValueError("takeover needs operator_pcm")
        for slot in batch.forced_text:
            if not 0 <= slot < B:
                raise ValueError(f"forced_text names slot {slot}, outside 0..{B - 1}")
        pcm_out = np.zeros((B, FRAME_SIZE), np.float32)
        ready = np.zeros(B, bool)
        text = [""] * B
        for slot in np.flatnonzero(active).tolist():
            state = self._slots[slot]
            if batch.admitted[slot] or state is None:
                state = self._open(slot)
            if slot in batch.forced_text:
                self._queues[slot].extend(self.forced_tokens(batch.forced_text[slot]))
            gen = state.gen
            if gen.step_idx >= MAX_CALL_STEPS:
                continue  # the call outlived moshi_mlx's buffer: no more output for it
            codes = state.mimi.encode_step(mx.array(batch.pcm[slot])[None, None])
            queue = self._queues[slot]
            state.sampler.force = TEXT_PAD_ID if takeover[slot] else (queue.popleft() if queue else None)
            self.lm.transformer_cache = state.cache
            token = gen.step(codes[:, :, 0])[0]  # (text token, transformer output)
            if takeover[slot] or state.op_codes:
                self._write_operator(slot, state, takeover[slot], batch.operator_pcm)
            audio = gen.last_audio_tokens()
            if audio is not None:
                out = state.mimi.decode_step(audio[:, :, None])
                pcm_out[slot] = np.asarray(out[0, 0], dtype=np.float32)
                ready[slot] = True
                tok = int(token.item())
                if not takeover[slot] and 0 <= tok < len(self._pieces):
                    text[slot] = self._pieces[tok]
        if takeover.any():
            pcm_out[takeover] = batch.operator_pcm[takeover]  # type: ignore[index]
            ready |= takeover
        elapsed = (time.perf_counter() - t0) * 1000.0
        self.last_step_ms = elapsed
        self.step_times_ms.append(elapsed)
        return StepOutput(pcm=pcm_out, ready=ready, text=text)

    def _write_operator(self, slot: int, state: _Slot, held: bool, operator_pcm: np.ndarray | None) -> None:
        """Put the operator's codes where the model's own codes for those steps went."""
        import mlx.core as mx

        gen = state.gen
        now = gen.step_idx - 1  # the step that just ran
        if held:
            if state.op_mimi is None:
                state.op_mimi = self._new_mimi()
                state.op_mimi.reset_all()
            codes = state.op_mimi.encode_step(mx.array(operator_pcm[slot])[None, None])  # type: ignore[index]
            state.op_codes[now] = np.asarray(codes[0, :, 0])
        for cb, delay in enumerate(gen.audio_delays[: gen.main_codebooks]):
            at = now - delay
            if at in state.op_codes and at >= 0:
                gen.gen_sequence[:, cb + 1, at] = int(state.op_codes[at][cb])
        state.op_codes = {k: v for k, v in state.op_codes.items() if k > now - 1 - gen.max_delay}

    def warmup(self) -> None:
        """Compile MLX's kernels on slot 0, then leave it closed."""
        batch = StepInput.silence(self.slots)
        batch.active[0] = True
        for i in range(4):
            batch.admitted[0] = i == 0
            self.step(batch)
        self.step_times_ms.clear()

    def describe(self) -> dict[str, object]:
        p50 = float(np.percentile(list(self.step_times_ms), 50)) if self.step_times_ms else None
        return {
            "model": self.name,
            "slots": self.slots,
            "device": "mlx",
            "batched": False,
            "last_step_ms": self.last_step_ms,
            "step_ms_p50": p50,
        }


def _random_codebooks(mimi: Any) -> None:
    """Random codewords, small against the latents (see synthetic.build_mimi): codes follow input."""
    import mlx.core as mx
    from moshi_mlx.modules.quantization import EuclideanCodebook

    for _, module in mimi.named_modules():
        if isinstance(module, EuclideanCodebook):
            module.update(
                {
                    "embedding_sum": mx.random.normal(module.embedding_sum.shape) * 1e-3,
                    "cluster_usage": mx.ones(module.cluster_usage.shape),
                    "initialized": mx.ones([1]),
                }
            )
