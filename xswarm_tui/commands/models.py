"""`xswarm models list|pull|verify`: MOSHI weights in the Hugging Face cache.

``list`` shows what is cached and what ``auto`` would run; ``pull`` downloads a checkpoint
(huggingface_hub's resumable download with progress bars) or imports a local folder copied
from another machine; ``verify`` re-hashes every file against its blob name (sha256 for the
large files, git sha1 for the small ones) or a folder's SHA256SUMS.
"""

from __future__ import annotations

from pathlib import Path

import typer

from xswarm_tui.commands._common import EXIT_BAD_INPUT, fail, load

app = typer.Typer(help="MOSHI weights: list, download, verify.", no_args_is_help=True)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def _repo_for(name: str | None, int8: bool) -> str:
    from engine.models.checkpoints import REPOS, check_repo_id

    if name is None:
        name = load().model.variant
    if name in ("moshiko", "moshika"):
        return REPOS[(name, "int8" if int8 else "bf16")]
    try:
        return check_repo_id(name)
    except ValueError as exc:
        fail(f"{exc}; or use moshiko / moshika", EXIT_BAD_INPUT)


@app.command("list")
def list_() -> None:
    """Cached MOSHI checkpoints and the model `auto` would pick."""
    from engine.models import checkpoints, registry

    settings = load()
    cache = checkpoints.hub_cache_dir()
    typer.echo(f"Hugging Face cache: {cache}")
    entries = checkpoints.list_cached(cache)
    if not entries:
        typer.echo("  no MOSHI checkpoints cached")
    for entry in entries:
        state = "complete" if entry.complete else "incomplete"
        typer.echo(f"  {entry.repo:<36} {(entry.revision or '-')[:12]:<13} {_gib(entry.size):>11}  {state}")
    if settings.model.weights_path:
        folder = Path(settings.model.weights_path)
        ok = checkpoints.is_complete(folder, int8=settings.model.weights == "int8")
        typer.echo(f"model.weights_path: {folder} ({'complete' if ok else 'incomplete or missing'})")
    choice = registry.resolve("auto", settings)
    typer.echo(f"auto -> {choice.spec}: {choice.reason}")


@app.command("pull")
def pull(
    name: str = typer.Argument(None, help="moshiko | moshika | org/name (default: model.variant)"),
    int8: bool = typer.Option(False, "--int8", help="the int8 (q8) checkpoint instead of bf16"),
    from_folder: Path = typer.Option(None, "--from", help="import this local folder instead of downloading"),
    revision: str = typer.Option(None, help="branch, tag or commit (downloads only)"),
) -> None:
    """Download a MOSHI checkpoint into the cache (or import a local copy)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from engine.models import checkpoints

    repo = _repo_for(name, int8)
    if from_folder is not None:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()) as bar:
            task = bar.add_task(f"importing {repo}", total=None)

            def progress(done: int, total: int, file: str) -> None:
                bar.update(task, completed=done, total=total, description=f"importing {file}")

            try:
                snap = checkpoints.import_folder(from_folder, repo, progress=progress)
            except (FileNotFoundError, ValueError) as exc:
                fail(str(exc), EXIT_BAD_INPUT)
    else:
        try:
            snap = checkpoints.download(repo, int8=int8, revision=revision)
        except Exception as exc:  # huggingface_hub raises many types; all mean "not downloaded"
            fail(f"download of {repo} failed: {exc}")
    try:
        checkpoints.checkpoint_files(snap, int8=int8)
    except FileNotFoundError as exc:
        fail(f"{repo} is cached but incomplete: {exc}")
    typer.echo(f"{repo} ready at {snap}")


@app.command("verify")
def verify(
    target: str = typer.Argument(
        None, help="org/name, moshiko, moshika or a folder (default: every cached MOSHI repo)"
    ),
) -> None:
    """Re-hash every file; exit 1 if any does not match."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from engine.models import checkpoints

    folders: list[tuple[str, Path]] = []
    if target is None:
        folders = [(e.repo, e.snapshot) for e in checkpoints.list_cached() if e.snapshot is not None]
        if not folders:
            fail("no MOSHI checkpoints cached; run `xswarm models pull`")
    elif Path(target).is_dir():
        folders = [(target, Path(target))]
    else:
        repo = _repo_for(target, "q8" in target)
        snap = checkpoints.snapshot_dir(repo)
        if snap is None:
            fail(f"{repo} is not in the cache ({checkpoints.hub_cache_dir()})", EXIT_BAD_INPUT)
        folders = [(repo, snap)]
    bad = 0
    for label, folder in folders:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True) as bar:
            task = bar.add_task(f"hashing {label}", total=None)
            results = checkpoints.verify(
                folder,
                progress=lambda done, total, file: bar.update(task, completed=done, total=total),  # noqa: B023 - used in-loop
            )
        typer.echo(label)
        for r in results:
            mark = {True: "ok", False: "CORRUPT", None: "unchecked"}[r.ok]
            typer.echo(f"  {mark:<9} {r.name}  [{r.how}]{'  ' + r.detail if r.detail else ''}")
            bad += r.ok is False
    if bad:
        fail(f"{bad} file(s) do not match their checksums; pull them again")
