"""Where MOSHI weights live on this machine: the Hugging Face cache or a local folder.

Light on purpose (no torch, no huggingface_hub at import): ``registry.resolve("auto")`` and
``xswarm doctor`` call ``find_local`` on every start. The cache layout is the hub client's:

    <cache>/models--org--name/refs/<branch>                    the revision a branch points at
    <cache>/models--org--name/blobs/<sha256 | git sha1>        file contents
    <cache>/models--org--name/snapshots/<revision>/<file>      -> ../../blobs/<name>

Large (LFS) files are named by their sha256 and small ones by their git blob sha1, so every
cached file can be verified from its blob name alone (``verify``). ``pull`` downloads through
huggingface_hub, or imports a local folder (an air-gapped copy) into the same layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MOSHI_NAME = "model.safetensors"
MOSHI_Q8_NAME = "model.q8.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
"""The file names moshi 0.2.13 looks for (``moshi.models.loaders``), repeated here so this
module needs no torch; ``tests/test_models_checkpoints.py`` checks they still match."""

REPOS: dict[tuple[str, str], str] = {
    ("moshiko", "bf16"): "kyutai/moshiko-pytorch-bf16",
    ("moshika", "bf16"): "kyutai/moshika-pytorch-bf16",
    ("moshiko", "int8"): "kyutai/moshiko-pytorch-q8",
    ("moshika", "int8"): "kyutai/moshika-pytorch-q8",
}
MLX_REPOS: dict[str, str] = {
    "moshiko": "kyutai/moshiko-mlx-q8",
    "moshika": "kyutai/moshika-mlx-q8",
}
MLX_Q4_REPOS: dict[str, str] = {
    "moshiko": "kyutai/moshiko-mlx-q4",
    "moshika": "kyutai/moshika-mlx-q4",
}


def mlx_repos(voice: str, weights: str) -> list[str]:
    """MLX repositories for a voice, the preferred precision first (int4 -> q4, else q8)."""
    q8, q4 = MLX_REPOS[voice], MLX_Q4_REPOS[voice]
    return [q4, q8] if weights == "int4" else [q8, q4]


LFS_SUFFIXES = (".safetensors", ".model", ".bin", ".pt", ".gguf", ".npz")
LFS_MIN_BYTES = 10 * 2**20
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int, str], None]
"""progress(bytes done, bytes total, file name)."""


def hub_cache_dir() -> Path:
    """The hub cache, found the way huggingface_hub finds it (HF_HUB_CACHE, HF_HOME, XDG)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def repo_dir(repo: str, cache: Path | None = None) -> Path:
    check_repo_id(repo)
    return (cache or hub_cache_dir()) / ("models--" + repo.replace("/", "--"))


def check_repo_id(repo: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo) or ".." in repo:
        raise ValueError(f"not a Hugging Face repository id: {repo!r} (expected org/name)")
    return repo


def snapshot_dir(repo: str, cache: Path | None = None, revision: str | None = None) -> Path | None:
    """The snapshot folder a branch (default main) or commit points at, if it is cached."""
    base = repo_dir(repo, cache)
    rev = revision or "main"
    if not _HEX40.match(rev):
        ref = base / "refs" / rev
        if not ref.is_file():
            return None
        rev = ref.read_text(encoding="utf-8").strip()
    snap = base / "snapshots" / rev
    return snap if snap.is_dir() else None


@dataclass(frozen=True)
class CheckpointFiles:
    moshi: Path
    mimi: Path
    tokenizer: Path
    config: Path | None
    mimi_config: Path | None = None
    lora: Path | None = None


def checkpoint_files(folder: Path, *, int8: bool = False) -> CheckpointFiles:
    """The files of a PyTorch MOSHI checkpoint in ``folder``, or FileNotFoundError naming what is missing.

    ``config.json`` (optional, as in moshi) may rename the files.
    """
    folder = Path(folder)
    config = folder / "config.json"
    names: dict[str, Any] = {}
    if config.is_file():
        try:
            names = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{config}: not readable JSON ({exc})") from None
        if not isinstance(names, dict):
            raise FileNotFoundError(f"{config}: expected a JSON object")
    moshi = folder / str(names.get("moshi_name", MOSHI_Q8_NAME if int8 else MOSHI_NAME))
    mimi = folder / str(names.get("mimi_name", MIMI_NAME))
    tokenizer = folder / str(names.get("tokenizer_name", TEXT_TOKENIZER_NAME))
    mimi_config = folder / str(names["mimi_config_name"]) if names.get("mimi_config_name") else None
    lora = folder / str(names["lora_name"]) if names.get("lora_name") else None
    missing = [p.name for p in (moshi, mimi, tokenizer, mimi_config, lora) if p is not None and not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")
    return CheckpointFiles(moshi, mimi, tokenizer, config if config.is_file() else None, mimi_config, lora)


def is_complete(folder: Path, *, int8: bool = False) -> bool:
    try:
        checkpoint_files(folder, int8=int8)
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class Found:
    """Weights ``auto`` can use: the model spec to run and where the files are."""

    spec: str
    location: Path
    repo: str | None = None


def _apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def find_local(settings: Any) -> Found | None:
    """Weights already on this machine, preferring what the settings ask for; None if none."""
    m = settings.model
    q8 = m.weights == "int8"
    if m.weights_path is not None:
        folder = Path(m.weights_path).expanduser()
        if is_complete(folder, int8=q8) or is_complete(folder, int8=not q8):
            return Found("moshi", folder)
    cache = hub_cache_dir()
    if _apple_silicon():
        for voice in _voices(m.variant):
            for repo in mlx_repos(voice, m.weights):
                snap = snapshot_dir(repo, cache)
                if snap is not None and any(snap.glob("*.safetensors")):
                    return Found("moshi-mlx", snap, repo)
    # int8 prefers Kyutai's q8 checkpoint, then a bf16 one (quantized on load); bf16 and int4
    # prefer the bf16 checkpoint, then q8 (dequantized, or re-quantized to int4, on load).
    candidates: list[tuple[str, bool]] = []
    if m.hf_repo:
        candidates += [(m.hf_repo, q8), (m.hf_repo, not q8)]
    for voice in _voices(m.variant):
        for kind in ("int8", "bf16") if q8 else ("bf16", "int8"):
            candidates.append((REPOS[(voice, kind)], kind == "int8"))
    for repo, int8 in candidates:
        try:
            snap = snapshot_dir(repo, cache)
        except ValueError:
            continue
        if snap is not None and is_complete(snap, int8=int8):
            return Found("moshi", snap, repo)
    return None


def _voices(preferred: str) -> list[str]:
    return [preferred] + [v for v in ("moshiko", "moshika") if v != preferred]


# -- listing ----------------------------------------------------------------------------------


@dataclass
class CachedRepo:
    repo: str
    revision: str | None
    snapshot: Path | None
    files: list[tuple[str, int]] = field(default_factory=list)
    complete: bool = False

    @property
    def size(self) -> int:
        return sum(size for _, size in self.files)


def list_cached(cache: Path | None = None, *, only_moshi: bool = True) -> list[CachedRepo]:
    """Model repositories in the hub cache (MOSHI ones by default), newest layout facts only."""
    cache = cache or hub_cache_dir()
    out: list[CachedRepo] = []
    if not cache.is_dir():
        return out
    for base in sorted(cache.glob("models--*")):
        repo = base.name.removeprefix("models--").replace("--", "/", 1)
        if only_moshi and "moshi" not in repo.lower():
            continue
        try:
            snap = snapshot_dir(repo, cache)
        except ValueError:
            continue
        entry = CachedRepo(repo, snap.name if snap else None, snap)
        if snap is not None:
            for path in sorted(snap.rglob("*")):
                if path.is_file():
                    entry.files.append((str(path.relative_to(snap)), path.stat().st_size))
            int8 = "q8" in repo or any(name == MOSHI_Q8_NAME for name, _ in entry.files)
            entry.complete = is_complete(snap, int8=int8) or "mlx" in repo
        out.append(entry)
    return out


# -- checksums --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileCheck:
    name: str
    ok: bool | None
    """True: matches; False: corrupt; None: nothing to check it against."""
    how: str
    detail: str = ""


def _is_lfs(name: str, size: int) -> bool:
    return name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES


def _hash_file(path: Path, progress: Progress | None, done: int, total: int) -> tuple[str, str, int]:
    """(sha256, git blob sha1, bytes) of a file in one pass."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as fh:
        while chunk := fh.read(8 * 2**20):
            sha256.update(chunk)
            sha1.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total, path.name)
    return sha256.hexdigest(), sha1.hexdigest(), done


def _manifest(folder: Path) -> dict[str, str]:
    """``SHA256SUMS`` in a local folder (``sha256sum`` output format), if present."""
    sums = folder / "SHA256SUMS"
    out: dict[str, str] = {}
    if sums.is_file():
        for line in sums.read_text(encoding="utf-8").splitlines():
            parts = line.strip().split(maxsplit=1)
            if len(parts) == 2 and _HEX64.match(parts[0].lower()):
                out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def verify(folder: Path, progress: Progress | None = None) -> list[FileCheck]:
    """Check every file of a snapshot (against its blob name) or a folder (against SHA256SUMS)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    total = sum(p.stat().st_size for p in files)
    manifest = _manifest(folder)
    results: list[FileCheck] = []
    done = 0
    for path in files:
        name = str(path.relative_to(folder))
        sha256, sha1, done = _hash_file(path, progress, done, total)
        blob = Path(os.readlink(path)).name if path.is_symlink() else None
        if blob and _HEX64.match(blob):
            results.append(
                FileCheck(name, sha256 == blob, "sha256 (blob name)", "" if sha256 == blob else f"got {sha256}")
            )
        elif blob and _HEX40.match(blob):
            results.append(
                FileCheck(name, sha1 == blob, "git blob sha1 (blob name)", "" if sha1 == blob else f"got {sha1}")
            )
        elif name in manifest:
            ok = manifest[name] == sha256
            results.append(FileCheck(name, ok, "sha256 (SHA256SUMS)", "" if ok else f"got {sha256}"))
        else:
            results.append(FileCheck(name, None, "none", f"sha256 {sha256}"))
    return results


# -- pulling ----------------------------------------------------------------------------------


def needed_files(int8: bool) -> list[str]:
    return ["config.json", MOSHI_Q8_NAME if int8 else MOSHI_NAME, MIMI_NAME, TEXT_TOKENIZER_NAME]


def import_folder(
    source: Path,
    repo: str,
    *,
    cache: Path | None = None,
    progress: Progress | None = None,
    files: Iterable[str] | None = None,
) -> Path:
    """Copy a local checkpoint folder into the hub cache layout (hashing while copying).

    For machines without network access: copy the weights over by hand, then import them
    so ``auto`` and ``verify`` treat them like a download. A ``SHA256SUMS`` in the source is
    checked on the way in. Returns the snapshot folder.
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a folder")
    names = (
        sorted(files)
        if files is not None
        else sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    )
    names = [n for n in names if (source / n).is_file()]
    if not names:
        raise FileNotFoundError(f"{source}: no files to import")
    base = repo_dir(repo, cache)
    blobs = base / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(source)
    total = sum((source / n).stat().st_size for n in names)
    done = 0
    stored: list[tuple[str, str]] = []
    for name in names:
        src = source / name
        size = src.stat().st_size
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(b"blob %d\0" % size)
        fd, tmp_name = tempfile.mkstemp(dir=blobs, suffix=".incomplete")
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as fh:
                while chunk := fh.read(8 * 2**20):
                    out.write(chunk)
                    sha256.update(chunk)
                    sha1.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total, name)
            if name in manifest and manifest[name] != sha256.hexdigest():
                raise ValueError(f"{src}: sha256 {sha256.hexdigest()} does not match SHA256SUMS {manifest[name]}")
            blob = sha256.hexdigest() if _is_lfs(name, size) else sha1.hexdigest()
            os.replace(tmp_name, blobs / blob)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        stored.append((name, blob))
    # A content-derived revision: importing the same files twice gives the same snapshot.
    revision = hashlib.sha1("".join(f"{n}\0{b}\n" for n, b in stored).encode()).hexdigest()
    snap = base / "snapshots" / revision
    for name, blob in stored:
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blobs / blob, link.parent), link)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(revision, encoding="utf-8")
    return snap


def download(
    repo: str,
    *,
    int8: bool = False,
    cache: Path | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> Path:
    """Download a MOSHI checkpoint with huggingface_hub (its own progress bars, resumable)."""
    from huggingface_hub import snapshot_download

    check_repo_id(repo)
    path = snapshot_download(
        repo,
        revision=revision,
        cache_dir=str(cache) if cache else None,
        allow_patterns=needed_files(int8) + ["*.json"],
        endpoint=endpoint,
        token=token,
    )
    return Path(path)
