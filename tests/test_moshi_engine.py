"""The batched MOSHI engine core on the real moshi code (tiny random-weight configs, CPU).

Greedy sampling and fixed weights make every run deterministic, so isolation is checked by
comparing a slot's outputs between two runs of the same batch size that differ only in what
the OTHER slots do (batch against batch: a B=1 run may differ by float rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.models.base import FRAME_SIZE, StepInput
from engine.models.synthetic import SyntheticMoshi

torch.set_num_threads(1)  # 2 shared cores: more threads only thrash
B = 3
CONTEXT = 64
"""A short attention window keeps the tests fast; the ring cache wraps after 64 steps."""


@pytest.fixture(scope="module")
def parts():
    """Build the tiny weights once; each test attaches fresh streaming state to them."""
    model = SyntheticMoshi(B, size="tiny", device="cpu", greedy=True, warmup_steps=0, context=CONTEXT)
    model.load()
    built = model.parts
    model.close()
    return built


@pytest.fixture
def make(parts):
    made: list[SyntheticMoshi] = []

    def _make(warmup_steps: int = 0) -> SyntheticMoshi:
        for old in made:
            old.close()
        made.clear()
        model = SyntheticMoshi(B, size="tiny", device="cpu", greedy=True, warmup_steps=warmup_steps, context=CONTEXT)
        model.load(parts=parts)
        made.append(model)
        return model

    yield _make
    for old in made:
        old.close()


def _audio(seed: int, steps: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((steps, FRAME_SIZE)) * 0.1).astype(np.float32)


def _run(model: SyntheticMoshi, calls: list[dict], steps: int) -> list:
    """Each call: slot, from, to (steps), audio [to-from, FRAME]; optional forced/takeover
    maps from the call's own step index to a text or an operator frame."""
    outs = []
    for t in range(steps):
        batch = StepInput.silence(B)
        for call in calls:
            slot, k = call["slot"], t - call["from"]
            if not 0 <= k < call["to"] - call["from"]:
                continue
            batch.active[slot] = True
            batch.admitted[slot] = k == 0
            batch.pcm[slot] = call["audio"][k]
            if k in call.get("forced", {}):
                batch.forced_text[slot] = call["forced"][k]
            if k in call.get("takeover", {}):
                if batch.takeover is None:
                    batch.takeover = np.zeros(B, bool)
                    batch.operator_pcm = np.zeros((B, FRAME_SIZE), np.float32)
                batch.takeover[slot] = True
                batch.operator_pcm[slot] = call["takeover"][k]
        outs.append(model.step(batch))
    return outs


def _slot(outs: list, slot: int, start: int, stop: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    return (
        np.stack([o.pcm[slot] for o in outs[start:stop]]),
        [o.text[slot] for o in outs[start:stop]],
        np.array([o.ready[slot] for o in outs[start:stop]]),
    )


def _call(slot: int, start: int, stop: int, seed: int, **extra) -> dict:
    return {"slot": slot, "from": start, "to": stop, "audio": _audio(seed, stop - start), **extra}


def test_out_of_sync_admission_never_blanks_live_slots(make):
    outs = _run(make(), [_call(0, 0, 20, 1), _call(1, 7, 20, 2)], 20)
    ready0 = [bool(o.ready[0]) for o in outs]
    assert ready0[0] is False, "a call's first step is inside MOSHI's acoustic delay"
    assert all(ready0[1:]), "slot 0 lost output when slot 1 joined"
    ready1 = [bool(o.ready[1]) for o in outs]
    assert not any(ready1[:8]) and all(ready1[8:]), ready1
    assert not any(o.ready[2] for o in outs), "an empty slot reported output"
    for o in outs:
        assert o.pcm.shape == (B, FRAME_SIZE) and o.pcm.dtype == np.float32
        assert np.isfinite(o.pcm).all()


def test_joining_and_leaving_slots_do_not_disturb_others(make):
    steps = 24
    alone = _run(make(), [_call(0, 0, steps, 10)], steps)
    busy = _run(
        make(),
        [
            _call(0, 0, steps, 10),
            _call(1, 5, 13, 11),  # joins, then leaves mid-run
            _call(2, 9, steps, 12),
        ],
        steps,
    )
    pcm_a, text_a, ready_a = _slot(alone, 0, 0, steps)
    pcm_b, text_b, ready_b = _slot(busy, 0, 0, steps)
    np.testing.assert_array_equal(ready_a, ready_b)
    np.testing.assert_array_equal(pcm_a, pcm_b)
    assert text_a == text_b
    assert np.abs(pcm_a[1:]).max() > 0, "the model produced no audio at all"


def test_a_reused_slot_starts_like_a_fresh_call(make):
    """Admission resets the slot's LM caches and Mimi streams: nothing of the last call remains."""
    second = _call(1, 9, 19, 21)
    fresh = _run(make(), [dict(second, **{"from": 0, "to": 10})], 10)
    reused = _run(make(), [_call(1, 0, 5, 20), _call(0, 0, 19, 22), second], 19)
    pcm_f, text_f, ready_f = _slot(fresh, 1, 0, 10)
    pcm_r, text_r, ready_r = _slot(reused, 1, 9, 19)
    np.testing.assert_array_equal(ready_f, ready_r)
    np.testing.assert_array_equal(pcm_f, pcm_r)
    assert text_f == text_r


def test_warmup_leaves_a_clean_slate(make):
    calls = [_call(0, 0, 8, 30), _call(2, 2, 8, 31)]
    cold = _run(make(), calls, 8)
    warmed = make(warmup_steps=4)
    warmed.warmup()
    warm = _run(warmed, calls, 8)
    for slot in (0, 2):
        pcm_c, text_c, ready_c = _slot(cold, slot, 0, 8)
        pcm_w, text_w, ready_w = _slot(warm, slot, 0, 8)
        np.testing.assert_array_equal(ready_c, ready_w)
        np.testing.assert_array_equal(pcm_c, pcm_w)
        assert text_c == text_w
        assert np.abs(pcm_c).max() > 0, "silence on both sides would prove nothing"


def test_whisper_is_forced_into_its_slot_only(make):
    steps = 16
    base = _run(make(), [_call(0, 0, steps, 40), _call(1, 0, steps, 41)], steps)
    model = make()
    whispered = _run(model, [_call(0, 0, steps, 40), _call(1, 0, steps, 41, forced={2: "hello thanks"})], steps)
    np.testing.assert_array_equal(_slot(base, 0, 0, steps)[0], _slot(whispered, 0, 0, steps)[0])
    assert _slot(base, 0, 0, steps)[1] == _slot(whispered, 0, 0, steps)[1]
    text = "".join(_slot(whispered, 1, 0, steps)[1])
    assert "hello thanks" in text, text
    assert "hello" not in "".join(_slot(base, 1, 0, steps)[1])


def test_forced_text_schedule_has_moshi_monologue_shape(make):
    model = make()
    tokens = model.forced_tokens("hello  thanks")
    assert tokens[0] == 0, "a word starts after the end-of-padding token"
    assert len(tokens) >= 2 * 4
    pieces = "".join(model.parts.tokenizer.id_to_piece(t) for t in tokens if t not in (0, 3))
    assert pieces.replace("\u2581", " ").split() == ["hello", "thanks"]


def test_takeover_writes_operator_codes_into_its_slot_with_delays(make):
    steps = 14
    operator = _audio(50, steps)
    base = _run(make(), [_call(0, 0, steps, 51), _call(1, 0, steps, 52)], steps)
    model = make()
    codes_in: list[torch.Tensor] = []
    tokens_out: list[torch.Tensor] = []
    encode, step = model.op_mimi.encode, model.lm_gen.step
    model.op_mimi.encode = lambda x: codes_in.append(encode(x)) or codes_in[-1]
    model.lm_gen.step = lambda c: tokens_out.append(step(c)) or tokens_out[-1]
    held = {k: operator[k] for k in range(4, 9)}  # steps 4..8 under takeover
    outs = _run(model, [_call(0, 0, steps, 51), _call(1, 0, steps, 52, takeover=held)], steps)
    # The caller hears the operator, unchanged, while the operator holds the call.
    for k in held:
        np.testing.assert_array_equal(outs[k].pcm[1], operator[k])
        assert outs[k].ready[1] and outs[k].text[1] == ""
    # The model's own stream of that slot holds the operator's Mimi codes, delay-aligned:
    # the tokens returned at step k+1 are the frame of step k.
    for n, k in enumerate(held):
        assert torch.equal(tokens_out[k + 1][1, 1:, 0], codes_in[n][1, :8, 0]), k
    # Other slots are untouched; the held slot continues from a context that now differs.
    np.testing.assert_array_equal(_slot(base, 0, 0, steps)[0], _slot(outs, 0, 0, steps)[0])
    assert not np.array_equal(_slot(base, 1, 10, steps)[0], _slot(outs, 1, 10, steps)[0])
    assert all(o.ready[1] for o in outs[10:])


def test_bad_inputs_are_rejected(make):
    model = make()
    with pytest.raises(ValueError, match="pcm"):
        model.step(StepInput.silence(B + 1))
    batch = StepInput.silence(B)
    batch.forced_text[B] = "hi"
    with pytest.raises(ValueError, match="slot"):
        model.step(batch)
    batch = StepInput.silence(B)
    batch.active[0] = True
    batch.takeover = np.array([True, False, False])
    with pytest.raises(ValueError, match="operator_pcm"):
        model.step(batch)
