"""One slot-based interface for every voice model.

A model holds a fixed number of *slots* (the batch size B, constant for the process lifetime
because CUDA graphs need constant shapes). Each live call owns one slot. Once per 80 ms tick
the scheduler calls ``step`` ONCE for the whole batch, on the inference thread, with one
1920-sample 24 kHz frame per slot and the per-slot controls; the model returns one output
frame per slot.

Threading contract: ``load``, ``warmup`` and ``step`` run on the inference thread only (MLX
and CUDA graphs are not thread-safe). Everything a step needs arrives in ``StepInput``; the
model keeps its own per-slot state (token queues, streaming state) private to that thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.tick import FRAME_SIZE

Progress = Callable[[float, str], None]
"""progress(fraction 0..1, what is happening) while a model loads."""


@dataclass
class StepInput:
    """Everything one batched step needs. Arrays are indexed by slot."""

    pcm: np.ndarray
    """float32 [B, FRAME_SIZE], caller audio in -1..1 (silence for idle or late slots)."""
    active: np.ndarray
    """bool [B]: slots holding a live call. Outputs of inactive slots are discarded."""
    admitted: np.ndarray
    """bool [B]: slots whose call joined since the last step; their state must be reset."""
    operator_pcm: np.ndarray | None = None
    """float32 [B, FRAME_SIZE] operator audio, meaningful where ``takeover`` is True."""
    takeover: np.ndarray | None = None
    """bool [B]: the operator speaks instead of the AI on these slots."""
    forced_text: dict[int, str] = field(default_factory=dict)
    """slot -> text newly queued to be forced into the AI's text stream (whisper, greeting)."""

    @classmethod
    def silence(cls, slots: int) -> StepInput:
        return cls(
            pcm=np.zeros((slots, FRAME_SIZE), np.float32),
            active=np.zeros(slots, bool),
            admitted=np.zeros(slots, bool),
        )


@dataclass
class StepOutput:
    pcm: np.ndarray
    """float32 [B, FRAME_SIZE], the AI's (or, under takeover, the operator's) audio."""
    ready: np.ndarray
    """bool [B]: slots whose ``pcm`` is real output (False inside the model's start-up delay)."""
    text: list[str]
    """Per slot, the AI's text decoded this step ("" when none)."""


class VoiceModel(ABC):
    """A voice model that serves ``slots`` calls with one batched ``step``."""

    name: str = "model"

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a model needs at least one slot")
        self.slots = slots

    def load(self, progress: Progress | None = None) -> None:  # noqa: B027 - an optional hook
        """Build or load weights (may take minutes). Default: nothing to load."""

    def warmup(self) -> None:  # noqa: B027 - an optional hook
        """Run throwaway steps so the first call does not pay for lazy initialisation."""

    @abstractmethod
    def step(self, batch: StepInput) -> StepOutput:
        """One 80 ms step for every slot at once."""

    def describe(self) -> dict[str, object]:
        """Facts about the loaded model for the runtime's snapshot (what supervisors and the
        console receive): subclasses add device, dtype, step times and warnings. Called on the
        runtime loop while steps run on the inference thread, so it only reads."""
        return {"model": self.name, "slots": self.slots}
