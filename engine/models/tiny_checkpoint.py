"""A tiny random MOSHI checkpoint on disk, in the exact Hugging Face cache layout.

Why: the real loading path (``CheckpointInfo.from_hf_repo`` → safetensors → ``get_mimi`` /
``get_moshi``) and the cache tools (``xswarm models list|verify``) must be tested without a
hub or the 15 GB weights. The checkpoint is written as a plain folder (what someone would
copy from another machine), then imported with ``checkpoints.import_folder``, which stores it
as the hub client does (see ``engine.models.checkpoints``).
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
from pathlib import Path

_CORPUS = """hello thanks for calling how can I help you today
I would like to book an appointment for tomorrow morning
sure let me check the calendar for you one moment please
the office opens at nine and closes at five in the evening
your order has shipped and will arrive on friday afternoon
can you hear me now please hold while I transfer your call
my name is moshi and I am happy to talk with you
goodbye and have a wonderful day""".splitlines()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_proto() -> bytes:
    """A small SentencePiece model (trained in ~10 ms) with MOSHI's special ids: 0 and 3 pad."""
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=buf,
        vocab_size=200,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        model_type="unigram",
        minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


def write_tiny_folder(folder: Path, seed: int = 0, *, q8: bool = False) -> Path:
    """Tiny Mimi + tiny LM (random, bf16 LM) + tokenizer + config.json as plain files.

    ``q8``: the LM is stored as Kyutai's int8 checkpoints are (``model.q8.safetensors``, every
    Linear as int8 codes plus ``weight_scb``), from the same random bf16 weights."""
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    from engine.models.quantize import q8_state_dict
    from engine.models.synthetic import build_mimi, lm_config, mimi_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    mimi = build_mimi("tiny")
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config("tiny"), dtype=torch.bfloat16)
    config = lm_config("tiny") | {
        "moshi_name": loaders.MOSHI_Q8_NAME if q8 else loaders.MOSHI_NAME,
        "mimi_name": loaders.MIMI_NAME,
        "tokenizer_name": loaders.TEXT_TOKENIZER_NAME,
        "mimi_config_name": "mimi_config.json",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "mimi_config.json").write_text(json.dumps(mimi_config("tiny"), indent=1))
    if q8:
        save_file(q8_state_dict(lm), str(folder / loaders.MOSHI_Q8_NAME))
    else:
        save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(folder / loaders.MOSHI_NAME))
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(folder / loaders.MIMI_NAME))
    (folder / loaders.TEXT_TOKENIZER_NAME).write_bytes(tiny_tokenizer_proto())
    return folder


def write_tiny_checkpoint(
    cache_dir: Path, repo: str = "kyutai/moshiko-pytorch-bf16", seed: int = 0, *, q8: bool = False
) -> Path:
    """Write the tiny checkpoint into a hub cache as ``repo``; return its snapshot folder."""
    from engine.models.checkpoints import import_folder

    with tempfile.TemporaryDirectory() as tmp:
        return import_folder(write_tiny_folder(Path(tmp) / "ckpt", seed, q8=q8), repo, cache=Path(cache_dir))
