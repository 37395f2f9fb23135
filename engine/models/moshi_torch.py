"""MOSHI on PyTorch: the batched engine core, and the real-weights model built on it.

``BatchedMoshi`` is the heart of the engine. It holds ONE ``LMGen`` and ONE Mimi in streaming
mode with ``B`` slots (``streaming_forever(B)``) and steps every live call at once:

* a call joining resets only its own slot (``reset_streaming(mask)``), so the other calls'
  KV caches and codec states are untouched;
* empty slots are skipped with ``set_exec_mask`` and their outputs are never returned as ready;
* ``LMGen(support_out_of_sync=True)``: slots inside their acoustic delay yield
  ``ungenerated_token_id``; those codes are replaced before ``mimi.decode`` and the decoder
  state of such slots does not move (exec mask = ready);
* like ``moshi.server``, the Mimi encoder of a slot is reset after its call's first frame so
  the encoder's left padding applies again to the second frame (the first frame's codes still
  reach the LM);
* per-slot controls are applied inside the step through moshi's hooks with per-slot masks and
  ``torch.where`` (no per-slot host syncs): forced text (whisper, greeting) via
  ``on_text_hook``; takeover via ``on_audio_hook``, which writes the operator's Mimi codes into
  the slot's own audio stream with the model's per-codebook delays, so after hand-back the
  model's context holds what the operator said.

``SyntheticMoshi`` (random weights) and ``MoshiModel`` (real weights) differ only in how they
build the parts (``_build``). torch and moshi are imported when this module is imported, which
the registry does lazily.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from engine.models.base import FRAME_SIZE, Progress, StepInput, StepOutput, VoiceModel

log = logging.getLogger("xswarm.models")

TEXT_PAD_ID = 3
"""``existing_text_padding_id``: the inner monologue's "no word now" token."""
TEXT_EPAD_ID = 0
"""``existing_text_end_padding_id``: comes right before a new word starts."""
STEPS_PER_FORCED_WORD = 4
"""A forced word takes at least this many 80 ms steps (≈3 words/s, a calm speaking pace)."""

CPU_WARNING = (
    "MOSHI is running on the CPU: expect it to be far slower than real time "
    "(each 80 ms step takes longer than 80 ms). Use a CUDA GPU for live calls."
)


def pick_device(requested: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU (with a logged warning)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning(CPU_WARNING)
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} asked for, but torch sees no CUDA GPU")
    if device.type == "mps":
        raise RuntimeError("PyTorch MPS cannot hold MOSHI's tensors; use the moshi-mlx model on Apple Silicon")
    if device.type == "cpu":
        log.warning(CPU_WARNING)
    return device


@dataclass
class Parts:
    """What a subclass builds: the codec, the LM, the tokenizer and generation defaults."""

    mimi: Any
    lm: Any
    tokenizer: Any | None
    """sentencepiece.SentencePieceProcessor, or None (text then decodes to "")."""
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    """Extra facts for ``describe()`` (repo, location, parameter counts…)."""


_M = TypeVar("_M", bound=torch.nn.Module)


def _shared_copy(module: _M) -> _M:
    """A second module tree with its own streaming state but the SAME parameter tensors.

    Takeover needs a second Mimi encoder state per slot (the caller's stays in the main one);
    sharing the weights keeps that free in memory.
    """
    import copy

    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


class BatchedMoshi(VoiceModel):
    """ONE LMGen + ONE Mimi stepping ``slots`` calls per 80 ms tick."""

    name = "moshi"

    def __init__(
        self,
        slots: int,
        *,
        device: str = "auto",
        greedy: bool = False,
        seed: int | None = None,
        warmup_steps: int = 12,
        kv_cache: str = "bf16",
    ) -> None:
        super().__init__(slots)
        self.device_request = device
        from engine.models.kv_cache import check_kind

        self.kv_cache = check_kind(kv_cache)
        """KV cache storage of the temporal transformer: bf16 (moshi's own), int8 or fp8
        (``engine.models.kv_cache``); installed when streaming starts."""
        self.greedy = greedy
        self.seed = seed
        self.warmup_steps = warmup_steps
        self.last_step_ms: float | None = None
        """Wall time of the latest step (encode + LM + decode + host copies): what
        ``engine.models.bench`` times. Admission judges the scheduler's whole tick instead."""
        self.step_times_ms: deque[float] = deque(maxlen=512)
        self.steps = 0
        self.warning: str | None = None
        self._parts: Parts | None = None
        self._stack = ExitStack()

    # -- building -----------------------------------------------------------------------
    def _build(self, device: torch.device, progress: Progress | None) -> Parts:
        raise NotImplementedError

    def load(self, progress: Progress | None = None, *, parts: Parts | None = None) -> None:
        """Build the parts (or reuse ``parts`` from another instance: the benchmark sizes
        several batches on one set of weights) and enter streaming mode for ``slots``."""
        self.device = pick_device(self.device_request)
        if self.device.type == "cpu":
            self.warning = CPU_WARNING
            # Leave a core to the runtime's event loop: torch's spinning worker threads on
            # every core starve the bridge, and the step itself gets slower, not faster.
            torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))
        self._attach(parts if parts is not None else self._build(self.device, progress))
        if progress:
            progress(1.0, "model ready")

    def _attach(self, parts: Parts) -> None:
        """Set up streaming for ``slots`` slots on already-built parts."""
        from moshi.models import LMGen

        from engine.models import kv_cache

        self._parts = parts
        lm = parts.lm
        kv_cache.install(lm, self.kv_cache)
        self.mimi = parts.mimi
        self.op_mimi = _shared_copy(parts.mimi)
        kwargs = dict(parts.gen_kwargs)
        if self.greedy:
            kwargs["use_sampling"] = False
        self.lm_gen = LMGen(
            lm,
            on_text_hook=self._on_text,
            on_audio_hook=self._on_audio,
            support_out_of_sync=True,
            **kwargs,
        )
        B = self.slots
        dev = self.device
        self._stack.enter_context(self.lm_gen.streaming(B))
        self._stack.enter_context(self.mimi.streaming(B))
        self._stack.enter_context(self.op_mimi.streaming(B))
        self.dep_q = lm.dep_q
        # Delay of each of the model's own audio codebooks (rows 1..dep_q of the LM stream).
        delays = list(lm.delays[lm.audio_offset : lm.audio_offset + lm.dep_q])
        self.max_audio_delay = max(delays)
        self._delays_np = np.asarray(delays, dtype=np.int64)
        self._delay_idx = torch.tensor(delays, device=dev, dtype=torch.long)[None, :, None].expand(B, -1, 1)
        # Per-slot control state. Host side decides masks; device side holds codes.
        self._queues: list[deque[int]] = [deque() for _ in range(B)]
        self._tk_hist = np.zeros((B, self.max_audio_delay + 1), dtype=bool)
        """takeover at steps t, t-1, … (column d = d steps ago)."""
        self._code_hist = torch.zeros(B, self.dep_q, self.max_audio_delay + 1, dtype=torch.long, device=dev)
        self._text_mask = torch.zeros(B, dtype=torch.bool, device=dev)
        self._text_tok = torch.zeros(B, dtype=torch.long, device=dev)
        self._text_active = False
        self._audio_mask = torch.zeros(B, self.dep_q, dtype=torch.bool, device=dev)
        self._audio_codes = torch.zeros(B, self.dep_q, dtype=torch.long, device=dev)
        self._audio_active = False
        self._pieces = self._piece_table(parts.tokenizer)
        self._all = torch.ones(B, dtype=torch.bool, device=dev)
        if self.seed is not None:
            torch.manual_seed(self.seed)

    @staticmethod
    def _piece_table(tokenizer: Any | None) -> list[str]:
        """id -> text, '▁' as a space; control/unknown pieces and the pads as ''."""
        if tokenizer is None:
            return []
        table = []
        for i in range(tokenizer.vocab_size()):
            if i in (TEXT_EPAD_ID, TEXT_PAD_ID) or tokenizer.is_control(i) or tokenizer.is_unknown(i):
                table.append("")
            else:
                table.append(tokenizer.id_to_piece(i).replace("▁", " "))
        return table

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("model not loaded")
        return self._parts

    def close(self) -> None:
        """Leave streaming mode (frees the per-slot caches)."""
        self._stack.close()

    # -- hooks (run inside LMGen._step, outside CUDA graphs) -------------------------------
    def _on_text(self, text_tokens: torch.Tensor) -> None:
        if self._text_active:
            text_tokens.copy_(torch.where(self._text_mask, self._text_tok, text_tokens))

    def _on_audio(self, audio_tokens: torch.Tensor) -> None:
        if self._audio_active:
            audio_tokens.copy_(torch.where(self._audio_mask, self._audio_codes, audio_tokens))

    # -- controls --------------------------------------------------------------------------
    def forced_tokens(self, text: str) -> list[int]:
        """Text -> the token schedule forced into a slot's text stream.

        Each word is preceded by the end-of-padding token and followed by padding up to
        ``STEPS_PER_FORCED_WORD`` steps, the shape of MOSHI's own inner monologue, so the
        audio the depformer produces from it has room to say the word.
        """
        tokenizer = self._parts.tokenizer if self._parts else None
        if tokenizer is None:
            raise RuntimeError("this model has no text tokenizer, so text cannot be forced")
        out: list[int] = []
        for word in text.split():
            ids = [i for i in tokenizer.encode(word) if i not in (TEXT_EPAD_ID, TEXT_PAD_ID)]
            if not ids:
                continue
            out.append(TEXT_EPAD_ID)
            out.extend(ids)
            out.extend([TEXT_PAD_ID] * max(0, STEPS_PER_FORCED_WORD - len(ids) - 1))
        return out

    def _prepare_text(self, active: np.ndarray, takeover_now: np.ndarray) -> None:
        mask = np.zeros(self.slots, dtype=bool)
        toks = np.zeros(self.slots, dtype=np.int64)
        # Under takeover the operator speaks: pad the AI's text so its transcript shows no
        # words it never said (queued whispers wait until hand-back).
        mask |= takeover_now & active
        toks[takeover_now] = TEXT_PAD_ID
        for slot in np.flatnonzero(active & ~takeover_now):
            queue = self._queues[slot]
            if queue:
                mask[slot] = True
                toks[slot] = queue.popleft()
        self._text_active = bool(mask.any())
        if self._text_active:
            self._text_mask.copy_(torch.from_numpy(mask))
            self._text_tok.copy_(torch.from_numpy(toks))

    def _prepare_takeover(self, takeover: np.ndarray, operator_pcm: np.ndarray | None) -> None:
        """Encode operator audio and stage the delayed codes the audio hook writes."""
        self._tk_hist[:, 1:] = self._tk_hist[:, :-1]
        self._tk_hist[:, 0] = takeover
        if takeover.any():
            if operator_pcm is None:
                raise ValueError("takeover needs operator_pcm")
            starting = takeover & ~self._tk_hist[:, 1] if self._tk_hist.shape[1] > 1 else takeover
            tk = torch.from_numpy(takeover).to(self.device)
            if starting.any():
                self.op_mimi.reset_streaming(torch.from_numpy(starting).to(self.device))
            self.op_mimi.set_exec_mask(tk)
            pcm = torch.from_numpy(np.ascontiguousarray(operator_pcm, dtype=np.float32)).to(self.device)
            codes = self.op_mimi.encode(pcm[:, None, :])[:, : self.dep_q, 0]
            self._code_hist[:, :, 1:] = self._code_hist[:, :, :-1].clone()
            self._code_hist[:, :, 0] = torch.where(tk[:, None], codes, self._code_hist[:, :, 0])
        elif self._tk_hist.any():
            self._code_hist[:, :, 1:] = self._code_hist[:, :, :-1].clone()
        # Codebook k at step t carries the frame of step t - delay_k: write it when the
        # operator held the slot at that step.
        write = self._tk_hist[:, self._delays_np]  # [B, dep_q]
        self._audio_active = bool(write.any())
        if self._audio_active:
            self._audio_mask.copy_(torch.from_numpy(write))
            self._audio_codes.copy_(self._code_hist.gather(2, self._delay_idx)[:, :, 0])

    # -- the step --------------------------------------------------------------------------
    def _check(self, batch: StepInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B = self.slots
        if batch.pcm.shape != (B, FRAME_SIZE):
            raise ValueError(f"pcm must be [{B}, {FRAME_SIZE}], got {list(batch.pcm.shape)}")
        active = np.asarray(batch.active, dtype=bool)
        admitted = np.asarray(batch.admitted, dtype=bool)
        if active.shape != (B,) or admitted.shape != (B,):
            raise ValueError(f"active and admitted must be bool[{B}]")
        takeover = np.zeros(B, bool) if batch.takeover is None else np.asarray(batch.takeover, dtype=bool)
        if takeover.shape != (B,):
            raise ValueError(f"takeover must be bool[{B}]")
        if batch.operator_pcm is not None and batch.operator_pcm.shape != (B, FRAME_SIZE):
            raise ValueError(f"operator_pcm must be [{B}, {FRAME_SIZE}]")
        for slot in batch.forced_text:
            if not 0 <= slot < B:
                raise ValueError(f"forced_text names slot {slot}, outside 0..{B - 1}")
        return active, admitted, takeover & active

    @torch.no_grad()
    def step(self, batch: StepInput) -> StepOutput:
        t0 = time.perf_counter()
        active, admitted, takeover = self._check(batch)
        dev = self.device
        if admitted.any():
            adm = torch.from_numpy(admitted).to(dev)
            self.lm_gen.reset_streaming(adm)
            self.mimi.reset_streaming(adm)
            for slot in np.flatnonzero(admitted):
                self._queues[slot].clear()
            self._tk_hist[admitted] = False
        for forced_slot, forced in batch.forced_text.items():
            self._queues[forced_slot].extend(self.forced_tokens(forced))

        act = torch.from_numpy(active).to(dev)
        self.lm_gen.set_exec_mask(act)
        self.mimi.set_exec_mask(act)
        pcm = torch.from_numpy(np.ascontiguousarray(batch.pcm, dtype=np.float32)).to(dev)
        codes = self.mimi.encode(pcm[:, None, :])
        if admitted.any():
            # moshi.server: re-apply the encoder's left padding after a call's first frame.
            self.mimi.reset_streaming(adm)
        self._prepare_takeover(takeover, batch.operator_pcm)
        self._prepare_text(active, takeover)

        out = self.lm_gen.step(codes)  # [B, 1 + dep_q, 1]
        assert out is not None  # support_out_of_sync=True: a step always yields
        audio = out[:, 1:]
        valid = audio >= 0
        ready_t = act & valid.all(dim=1)[:, 0]
        self.mimi.set_exec_mask(ready_t)
        pcm_out = self.mimi.decode(torch.where(valid, audio, torch.zeros_like(audio)))

        pcm_np = pcm_out[:, 0].float().cpu().numpy()
        text_ids = out[:, 0, 0].cpu().numpy()
        ready = ready_t.cpu().numpy()
        if takeover.any():
            pcm_np[takeover] = batch.operator_pcm[takeover]  # type: ignore[index]
            ready = ready | takeover
        text = self._texts(text_ids, ready & ~takeover)
        elapsed = (time.perf_counter() - t0) * 1000.0
        self.last_step_ms = elapsed
        self.step_times_ms.append(elapsed)
        self.steps += 1
        return StepOutput(pcm=pcm_np, ready=ready, text=text)

    def _texts(self, ids: np.ndarray, ready: np.ndarray) -> list[str]:
        pieces = self._pieces
        out = [""] * self.slots
        for slot in np.flatnonzero(ready):
            tok = int(ids[slot])
            if 0 <= tok < len(pieces):
                out[slot] = pieces[tok]
        return out

    def warmup(self) -> None:
        """Throwaway steps (first steps are slow; CUDA graphs get captured), then a clean slate.

        The takeover and forced-text paths are exercised too, so the first supervisor action
        on a live call does not pay for them.
        """
        B = self.slots
        rng = np.random.default_rng(0)
        for i in range(self.warmup_steps):
            pcm = (rng.standard_normal((B, FRAME_SIZE)) * 0.05).astype(np.float32)
            batch = StepInput(pcm=pcm, active=np.ones(B, bool), admitted=np.full(B, i == 0))
            if i >= self.warmup_steps // 2:
                batch.takeover = np.full(B, i % 2 == 0)
                batch.operator_pcm = pcm
            self.step(batch)
        with torch.no_grad():
            self.lm_gen.reset_streaming(self._all)
            self.mimi.reset_streaming(self._all)
            self.op_mimi.reset_streaming(self._all)
        for queue in self._queues:
            queue.clear()
        self._tk_hist[:] = False
        self.step_times_ms.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step_ms_p50(self) -> float | None:
        times = list(self.step_times_ms)  # one C-level copy: safe against the inference thread
        return float(np.percentile(times, 50)) if times else None

    def describe(self) -> dict[str, object]:
        facts: dict[str, object] = {"model": self.name, "slots": self.slots}
        if self._parts is not None:
            facts.update(self._parts.facts)
            facts["device"] = str(self.device)
            facts["dtype"] = str(self._parts.lm.dtype).removeprefix("torch.")
            facts["context"] = self._parts.lm.context
            facts["kv_cache"] = self.kv_cache
        facts["last_step_ms"] = self.last_step_ms
        facts["step_ms_p50"] = self.step_ms_p50()
        if self.warning:
            facts["warning"] = self.warning
        return facts


# -- real weights -----------------------------------------------------------------------------


def default_slots(device: str) -> int:
    """Slot count when settings say 0: a batch a GPU can usually hold, 4 on CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return 4
    return 16


class MoshiModel(BatchedMoshi):
    """Kyutai's released MOSHI weights (Moshiko or Moshika), from a local folder or the HF cache.

    ``weights`` picks the LM's precision (``engine.models.quantize``): a bf16 checkpoint runs
    as is or is quantized while it loads; Kyutai's q8 checkpoint loads straight into int8 (or is
    dequantized for bf16). Mimi is always loaded in its own float dtype.
    """

    name = "moshi"

    def __init__(
        self,
        slots: int,
        *,
        repo: str,
        fallback_repo: str | None = None,
        weights_path: Path | None = None,
        weights: str = "bf16",
        kv_cache: str = "bf16",
        context: int = 3000,
        device: str = "auto",
        seed: int | None = None,
        greedy: bool = False,
    ) -> None:
        from engine.models.quantize import check_kind

        super().__init__(slots, device=device, greedy=greedy, seed=seed, kv_cache=kv_cache)
        self.repo = repo
        self.fallback_repo = fallback_repo
        """Used when ``repo`` is not cached: the other precision's checkpoint of the same voice."""
        self.weights_path = weights_path
        self.weights = check_kind(weights)
        self.context = context

    @classmethod
    def from_settings(cls, settings: Any, *, variant: str | None, slots: int | None) -> MoshiModel:
        m = settings.model
        voice = variant or m.variant
        if voice not in ("moshiko", "moshika"):
            raise ValueError(f"unknown MOSHI voice {voice!r}: use moshiko or moshika")
        from engine.models.checkpoints import REPOS

        first, second = ("int8", "bf16") if m.weights == "int8" else ("bf16", "int8")
        return cls(
            slots or m.slots or default_slots(m.device),
            repo=m.hf_repo or REPOS[(voice, first)],
            fallback_repo=None if m.hf_repo else REPOS[(voice, second)],
            weights_path=m.weights_path,
            weights=m.weights,
            kv_cache=m.kv_cache,
            context=m.context,
            device=m.device,
            seed=m.seed,
        )

    def _find(self) -> tuple[Path, str]:
        from engine.models import checkpoints

        if self.weights_path is not None:
            return Path(self.weights_path), self.repo
        for repo in (self.repo, self.fallback_repo):
            if repo is not None and (snap := checkpoints.snapshot_dir(repo)) is not None:
                return snap, repo
        raise FileNotFoundError(
            f"no MOSHI weights for {self.repo} in the Hugging Face cache "
            f"({checkpoints.hub_cache_dir()}); run `xswarm models pull`"
        )

    def _build(self, device: torch.device, progress: Progress | None) -> Parts:
        from engine.models import checkpoints
        from engine.models.quantize import config_for, load_lm

        config_for(self.weights, device)  # int4 on a CPU fails here, before any reading
        folder, repo = self._find()
        try:
            files = checkpoints.checkpoint_files(folder, int8=self.weights == "int8")
        except FileNotFoundError:
            files = checkpoints.checkpoint_files(folder, int8=self.weights != "int8")
        from moshi.models import loaders

        if progress:
            progress(0.05, f"reading checkpoint {folder}")
        # Every file is passed as a Path, so moshi reads them directly and never asks the hub:
        # no network wait even where it is unreachable (the effect HF_HUB_OFFLINE=1 has), and
        # no process-wide environment change that would later block `xswarm models pull`.
        info = (
            loaders.CheckpointInfo.from_hf_repo(
                repo,
                moshi_weights=files.moshi,
                mimi_weights=files.mimi,
                tokenizer=files.tokenizer,
                config_path=files.config,
                mimi_config_path=files.mimi_config,
                lora_weights=files.lora,
            )
            if files.config is not None
            else loaders.CheckpointInfo(files.moshi, files.mimi, files.tokenizer)
        )
        if progress:
            progress(0.2, "loading Mimi")
        mimi = info.get_mimi(device=device)
        if progress:
            progress(0.4, f"loading the MOSHI LM ({self.weights})")
        q8_file = files.moshi.name == checkpoints.MOSHI_Q8_NAME or bool((info.lm_config or {}).get("quantize"))
        if self.weights == "bf16" and not q8_file:
            lm = info.get_moshi(device=device, dtype=torch.bfloat16, lm_kwargs_overrides={"context": self.context})
        else:
            if files.lora is not None:
                raise RuntimeError("LoRA weights with quantized MOSHI weights are not supported; use weights = bf16")
            lm_kwargs = dict(info.lm_config or loaders._lm_kwargs) | {"context": self.context}
            lm = load_lm(files.moshi, lm_kwargs, device=device, weights=self.weights)
        tokenizer = info.get_text_tokenizer()
        return Parts(
            mimi=mimi,
            lm=lm,
            tokenizer=tokenizer,
            gen_kwargs=dict(info.lm_gen_config),
            facts={
                "spec": "moshi",
                "repo": repo,
                "location": str(folder),
                "weights": self.weights,
                "checkpoint": "q8" if q8_file else "bf16",
            },
        )
