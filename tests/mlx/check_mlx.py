"""Exercises MlxMoshi tiny (moshi_mlx + mlx[cpu], in the main environment) and prints JSON facts.

Called by tests/test_moshi_mlx.py through a subprocess: MLX keeps global state and is not
thread-safe, so it stays out of the test process.
"""

from __future__ import annotations

import json

import numpy as np

from engine.models.base import FRAME_SIZE, StepInput
from engine.models.moshi_mlx import MlxMoshi

rng = np.random.default_rng(0)
caller0 = (rng.standard_normal((12, FRAME_SIZE)) * 0.1).astype(np.float32)
caller1 = (rng.standard_normal((12, FRAME_SIZE)) * 0.1).astype(np.float32)
operator = (rng.standard_normal((12, FRAME_SIZE)) * 0.1).astype(np.float32)


def run(model: MlxMoshi, steps: int, *, second_call: bool, whisper: bool, takeover: range) -> list:
    outs = []
    for t in range(steps):
        batch = StepInput.silence(2)
        batch.active[0] = True
        batch.admitted[0] = t == 0
        batch.pcm[0] = caller0[t]
        if second_call and 3 <= t < 9:
            batch.active[1] = True
            batch.admitted[1] = t == 3
            batch.pcm[1] = caller1[t]
            if whisper and t == 4:
                batch.forced_text[1] = "hello thanks"
            if t in takeover:
                batch.takeover = np.array([False, True])
                batch.operator_pcm = np.stack([np.zeros(FRAME_SIZE, np.float32), operator[t]])
        outs.append(model.step(batch))
    return outs


def main() -> None:
    model = MlxMoshi(2, size="tiny", greedy=True)
    model.load()
    model.warmup()
    alone = run(model, 12, second_call=False, whisper=False, takeover=range(0))
    busy = run(model, 12, second_call=True, whisper=True, takeover=range(6, 8))
    import mlx.core as mx

    # The operator's codes, encoded independently, must sit in the slot's own stream at the
    # call's steps 3 and 4 (global steps 6 and 7): codebook 0 without delay, 1..7 one later.
    ref = model._new_mimi()
    ref.reset_all()
    op = [np.asarray(ref.encode_step(mx.array(operator[t])[None, None])[0, :, 0]) for t in (6, 7)]
    seq = np.asarray(model._slots[1].gen.gen_sequence[0])
    facts = {
        "ready0": [bool(o.ready[0]) for o in busy],
        "ready1": [bool(o.ready[1]) for o in busy],
        "slot0_same": all(
            np.array_equal(a.pcm[0], b.pcm[0]) and a.text[0] == b.text[0] for a, b in zip(alone, busy, strict=True)
        ),
        "text1": "".join(o.text[1] for o in busy),
        "text0": "".join(o.text[0] for o in busy),
        "operator_heard": all(np.array_equal(busy[t].pcm[1], operator[t]) for t in (6, 7)),
        "codes_step3": [int(x) for x in seq[1:9, 3]],
        "codes_step4": [int(x) for x in seq[1:9, 4]],
        "op_step6": [int(x) for x in op[0]],
        "op_step7": [int(x) for x in op[1]],
        "name": model.describe()["model"],
    }
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
