"""A tiny random MOSHI checkpoint on disk, in the exact Hugging Face cache layout.

Why: the real loading path (``CheckpointInfo.from_hf_repo`` → safetensors → ``get_mimi`` /
``get_moshi``) and the cache tools (``xswarm models list|verify``) must be tested without a
hub or the 15 GB weights. The files written here are what the hub would leave in the cache:

    <cache>/models--org--name/refs/main                      (the revision)
    <cache>/models--org--name/blobs/<sha256 or git sha1>     (file contents)
    <cache>/models--org--name/snapshots/<rev>/<file> -> ../../blobs/<name>

LFS files (weights, tokenizer) are named by their sha256, small files by their git blob sha1,
as the hub client does, so checksums can be verified from the names alone.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
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
        sentence_iterator=iter(_CORPUS * 20), model_writer=buf, vocab_size=200, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, model_type="unigram", minloglevel=2, num_threads=1,
    )
    return buf.getvalue()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_file(repo_dir: Path, revision: str, name: str, data: bytes, *, lfs: bool) -> Path:
    """Store one file as the hub client would (blob + relative symlink in the snapshot)."""
    blob_name = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / blob_name).write_bytes(data)
    link = repo_dir / "snapshots" / revision / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(blobs / blob_name, link.parent), link)
    return link


def write_tiny_checkpoint(cache_dir: Path, repo: str = "kyutai/moshiko-pytorch-bf16", seed: int = 0) -> Path:
    """Write a tiny random MOSHI (tiny Mimi + tiny LM + tokenizer + config.json); return the snapshot."""
    import torch
    from moshi.models import loaders
    from safetensors.torch import save

    from engine.models.synthetic import lm_config, mimi_config

    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, mimi_config=mimi_config("tiny"))
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config("tiny"), dtype=torch.bfloat16)
    revision = hashlib.sha1(f"{repo}:{seed}".encode()).hexdigest()
    repo_dir = Path(cache_dir) / ("models--" + repo.replace("/", "--"))
    config = lm_config("tiny") | {
        "moshi_name": loaders.MOSHI_NAME,
        "mimi_name": loaders.MIMI_NAME,
        "tokenizer_name": loaders.TEXT_TOKENIZER_NAME,
        "mimi_config_name": "mimi_config.json",
    }

    def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in module.state_dict().items()}

    add_file(repo_dir, revision, "config.json", json.dumps(config, indent=1).encode(), lfs=False)
    add_file(repo_dir, revision, "mimi_config.json", json.dumps(mimi_config("tiny"), indent=1).encode(), lfs=False)
    add_file(repo_dir, revision, loaders.MOSHI_NAME, save(tensors(lm)), lfs=True)
    add_file(repo_dir, revision, loaders.MIMI_NAME, save(tensors(mimi)), lfs=True)
    add_file(repo_dir, revision, loaders.TEXT_TOKENIZER_NAME, tiny_tokenizer_proto(), lfs=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir / "snapshots" / revision
