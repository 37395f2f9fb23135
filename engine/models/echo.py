"""The echo model: each slot hears its own audio back, one frame (80 ms) later.

Why it exists: it is the telephony self-test. It exercises the whole path (bridge, framing,
resampling, the batched scheduler, supervisor controls) on any machine, with an output that
is exactly predictable, so tests can cross-correlate what went in with what came out.

Controls behave as they would with MOSHI: under takeover the slot plays the operator's
audio; forced text comes back as the slot's text (so whispers are visible end to end).
"""

from __future__ import annotations

import numpy as np

from engine.config import Settings
from engine.models.base import FRAME_SIZE, StepInput, StepOutput, VoiceModel

DEFAULT_SLOTS = 128
"""Echo costs nothing per slot; this is what `auto` sizing picks for it."""


class EchoModel(VoiceModel):
    name = "echo"

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        super().__init__(slots)
        self._previous = np.zeros((slots, FRAME_SIZE), np.float32)

    @classmethod
    def from_settings(cls, settings: Settings, *, variant: str | None = None, slots: int | None = None) -> EchoModel:
        if variant:
            raise ValueError(f"the echo model has no variants (got {variant!r})")
        return cls(slots or settings.model.slots or DEFAULT_SLOTS)

    def step(self, batch: StepInput) -> StepOutput:
        out = self._previous
        out[batch.admitted] = 0.0  # a new call must not hear the previous caller
        if batch.takeover is not None and batch.operator_pcm is not None and batch.takeover.any():
            out[batch.takeover] = batch.operator_pcm[batch.takeover]
        # keep this step's input for the next one; the caller hands us a fresh array per step
        self._previous = np.array(batch.pcm, np.float32, copy=True)
        self._previous[~batch.active] = 0.0
        text = [""] * self.slots
        for slot, forced in batch.forced_text.items():
            text[slot] = forced
        return StepOutput(pcm=out, ready=batch.active.copy(), text=text)
