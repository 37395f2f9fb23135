"""Weights on disk: the HF cache layout, `auto`, offline loading of a real checkpoint (tiny,
random, written to disk), checksums, and the `xswarm models` commands."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.config import Settings
from engine.models import checkpoints, registry
from engine.models.base import FRAME_SIZE, StepInput
from engine.models.tiny_checkpoint import write_tiny_checkpoint, write_tiny_folder

torch.set_num_threads(1)
REPO = "kyutai/moshiko-pytorch-bf16"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach a host fails the test loudly (loading must be fully local)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_file_names_match_moshi() -> None:
    from moshi.models import loaders

    assert checkpoints.MOSHI_NAME == loaders.MOSHI_NAME
    assert checkpoints.MOSHI_Q8_NAME == loaders.MOSHI_Q8_NAME
    assert checkpoints.MIMI_NAME == loaders.MIMI_NAME
    assert checkpoints.TEXT_TOKENIZER_NAME == loaders.TEXT_TOKENIZER_NAME


def test_import_folder_writes_the_hub_cache_layout(cache: Path, tiny_folder: Path) -> None:
    snap = checkpoints.import_folder(tiny_folder, REPO, cache=cache)
    base = cache / "models--kyutai--moshiko-pytorch-bf16"
    assert (base / "refs" / "main").read_text() == snap.name
    weights = snap / "model.safetensors"
    assert weights.is_symlink()
    blob = Path(os.readlink(weights)).name
    assert blob == hashlib.sha256((tiny_folder / "model.safetensors").read_bytes()).hexdigest()
    assert checkpoints.snapshot_dir(REPO) == snap
    assert checkpoints.snapshot_dir(REPO, revision=snap.name) == snap
    # Importing the same files again gives the same snapshot (content-addressed revision).
    assert checkpoints.import_folder(tiny_folder, REPO, cache=cache) == snap


def test_auto_finds_cached_weights_without_importing_torch(cache: Path, tiny_folder: Path) -> None:
    assert checkpoints.find_local(Settings()) is None
    assert registry.resolve("auto", Settings()).spec == "echo"
    snap = checkpoints.import_folder(tiny_folder, "kyutai/moshika-pytorch-bf16", cache=cache)
    found = checkpoints.find_local(Settings())
    assert found is not None and found.spec == "moshi" and found.location == snap
    assert found.repo == "kyutai/moshika-pytorch-bf16"
    choice = registry.resolve("auto", Settings())
    assert choice.spec == "moshi" and str(snap) in choice.reason
    code = (
        "import sys; from engine.config import Settings; from engine.models import registry; "
        "print(registry.resolve('auto', Settings()).spec); "
        "print(any(m.split('.')[0] in ('torch', 'moshi', 'huggingface_hub') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert out.stdout.split() == ["moshi", "False"]


@pytest.mark.parametrize("spec", ["synthetic:huge", "synthetic:", "echo:loud"])
def test_bad_variant_is_refused_when_named(spec: str) -> None:
    """Caught at resolve (no torch), not when the model is built minutes into a start."""
    with pytest.raises(registry.ModelSpecError, match="tiny, small, 7b|no variants"):
        registry.resolve(spec, Settings())
    assert registry.resolve("synthetic:small", Settings()).spec == "synthetic:small"


def test_weights_path_folder_wins(cache: Path, tiny_folder: Path) -> None:
    settings = Settings(model={"weights_path": tiny_folder})
    found = checkpoints.find_local(settings)
    assert found is not None and found.location == tiny_folder


def test_incomplete_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="tokenizer_spm_32k_3.model"):
        checkpoints.checkpoint_files(tmp_path)
    assert not checkpoints.is_complete(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(FileNotFoundError, match="JSON object"):
        checkpoints.checkpoint_files(tmp_path)


def test_verify_catches_a_corrupt_blob(cache: Path, tiny_folder: Path) -> None:
    snap = checkpoints.import_folder(tiny_folder, REPO, cache=cache)
    results = checkpoints.verify(snap)
    assert {r.name for r in results} >= {"model.safetensors", "config.json", "tokenizer_spm_32k_3.model"}
    assert all(r.ok for r in results), results
    assert {r.how for r in results} == {"sha256 (blob name)", "git blob sha1 (blob name)"}
    blob = (snap / "config.json").resolve()
    blob.write_bytes(blob.read_bytes() + b" ")
    bad = [r for r in checkpoints.verify(snap) if r.ok is False]
    assert [r.name for r in bad] == ["config.json"]


def test_import_checks_a_sha256sums_manifest(cache: Path, tiny_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "copy"
    src.mkdir()
    (src / "a.model").write_bytes(b"abc")
    (src / "SHA256SUMS").write_text(f"{'0' * 64}  a.model\n")
    with pytest.raises(ValueError, match="does not match SHA256SUMS"):
        checkpoints.import_folder(src, "org/thing", cache=cache)
    assert not list((cache / "models--org--thing" / "blobs").glob("*")), "a bad file was kept"
    (src / "SHA256SUMS").write_text(f"{hashlib.sha256(b'abc').hexdigest()} *a.model\n")
    assert [r.ok for r in checkpoints.verify(src)] == [True]
    with pytest.raises(ValueError, match="org/name"):
        checkpoints.import_folder(src, "../etc", cache=cache)


def test_real_loading_path_offline(cache: Path, no_network: None) -> None:
    """CheckpointInfo.from_hf_repo + get_mimi/get_moshi on files in the cache, no network."""
    write_tiny_checkpoint(cache, REPO)
    settings = Settings(model={"name": "moshi", "device": "cpu", "slots": 2, "context": 64})
    model = registry.create("moshi", settings)
    model.load()
    try:
        facts = model.describe()
        assert facts["repo"] == REPO and facts["dtype"] == "bfloat16" and facts["context"] == 64
        assert "warning" in facts, "CPU use must be flagged"
        outs = []
        for t in range(4):
            batch = StepInput.silence(2)
            batch.active[0] = True
            batch.admitted[0] = t == 0
            batch.pcm[0] = np.sin(np.arange(FRAME_SIZE) / 9.0).astype(np.float32) * 0.2
            outs.append(model.step(batch))
        assert [bool(o.ready[0]) for o in outs] == [False, True, True, True]
        assert not any(o.ready[1] for o in outs)
        assert model.last_step_ms is not None and model.last_step_ms > 0
    finally:
        model.close()


def test_missing_weights_say_how_to_get_them(cache: Path) -> None:
    model = registry.create("moshi", Settings(model={"device": "cpu", "slots": 1}))
    with pytest.raises(FileNotFoundError, match="xswarm models pull"):
        model.load()


def _cli(*args: str) -> tuple[int, str]:
    from xswarm_tui.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_models_commands(cache: Path, tiny_folder: Path) -> None:
    code, out = _cli("models", "list")
    assert code == 0 and "no MOSHI checkpoints cached" in out and "auto -> echo" in out
    code, out = _cli("models", "pull", "moshika", "--from", str(tiny_folder))
    assert code == 0, out
    assert "kyutai/moshika-pytorch-bf16 ready" in out
    code, out = _cli("models", "list")
    assert code == 0 and "kyutai/moshika-pytorch-bf16" in out and "complete" in out and "auto -> moshi" in out
    code, out = _cli("models", "verify")
    assert code == 0 and out.count(" ok ") >= 4, out
    snap = checkpoints.snapshot_dir("kyutai/moshika-pytorch-bf16")
    blob = (snap / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    code, out = _cli("models", "verify", "moshika")
    assert code == 1 and "CORRUPT" in out and "model.safetensors" in out
    code, out = _cli("models", "pull", "not a repo", "--from", str(tiny_folder))
    assert code == 2 and "org/name" in out
    code, out = _cli("models", "pull", "moshiko", "--from", str(tiny_folder / "nope"))
    assert code == 2 and "not a folder" in out


def test_bench_engine_json() -> None:
    code, out = _cli(
        "bench",
        "engine",
        "--model",
        "synthetic:tiny",
        "--batch",
        "1,2",
        "--steps",
        "3",
        "--warmup",
        "2",
        "--threads",
        "1",
        "--context",
        "64",
        "--json",
    )
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["step_ms_p50"] > 0 and row["step_ms_p99"] >= row["step_ms_p50"]
        assert row["per_call_ms"] == pytest.approx(row["step_ms_p50"] / row["batch"], rel=1e-2)
    assert report["device"] == "cpu" and report["context"] == 64 and report["torch"] == torch.__version__
    code, out = _cli("bench", "engine", "--batch", "0,x")
    assert code == 2
    code, out = _cli("bench", "engine", "--model", "moshi")
    assert code == 2 and "synthetic" in out


class _FakeHub:
    """The three hub endpoints a snapshot download uses, serving one local folder as a repo,
    on 127.0.0.1: repo info, HEAD (commit, etag = sha256 for LFS files / git sha1 otherwise,
    size) and GET of each file."""

    def __init__(self, folder: Path, repo: str) -> None:
        import http.server
        import threading

        self.folder, self.repo, self.sha = folder, repo, "c" * 40
        self.gets: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _file(self) -> Path | None:
                prefix = f"/{hub.repo}/resolve/"
                if not self.path.startswith(prefix):
                    return None
                name = self.path[len(prefix) :].split("/", 1)[1]
                path = hub.folder / name
                return path if path.is_file() else None

            def _head(self, path: Path) -> None:
                data = path.read_bytes()
                lfs = path.suffix in (".safetensors", ".model")
                etag = (
                    hashlib.sha256(data).hexdigest()
                    if lfs
                    else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                )
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.sha)
                self.send_header("X-Linked-Etag" if lfs else "ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                self._head(path)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith(f"/api/models/{hub.repo}/revision/"):
                    body = json.dumps(
                        {
                            "id": hub.repo,
                            "sha": hub.sha,
                            "siblings": [{"rfilename": p.name} for p in sorted(hub.folder.iterdir())],
                        }
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                hub.gets.append(path.name)
                self._head(path)
                self.wfile.write(path.read_bytes())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_download_through_huggingface_hub_from_a_fake_hub(cache: Path, tiny_folder: Path) -> None:
    hub = _FakeHub(tiny_folder, REPO)
    try:
        snap = checkpoints.download(REPO, cache=cache, endpoint=hub.url)
        assert snap == checkpoints.snapshot_dir(REPO) and snap.name == hub.sha
        assert all(r.ok for r in checkpoints.verify(snap))
        assert checkpoints.find_local(Settings()).location == snap
        # `xswarm models pull` in its own process (HF_ENDPOINT is read when the hub client loads).
        other = cache.parent / "cache2"
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_CACHE": str(other),
            "PYTHONPATH": str(Path(__file__).parent.parent),
        }
        out = subprocess.run(
            [sys.executable, "-m", "xswarm_tui.cli", "models", "pull", "moshiko"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "kyutai/moshiko-pytorch-bf16 ready" in out.stdout
        assert checkpoints.snapshot_dir(REPO, cache=other) is not None
        assert "mimi_config.json" in hub.gets  # *.json files come along
    finally:
        hub.close()
