"""Log archives and the StorageService rounds (daily backup, pruning, archives), with a
small stand-in for the runtime (the full Runtime path is in test_recordings.py)."""

from __future__ import annotations

import asyncio
import gzip
import logging
import logging.handlers
import os
import time
from pathlib import Path

import pytest
from fixtures.s3 import S3Target

from engine import events
from engine.config import load_settings
from engine.paths import resolve_paths
from engine.storage import LocalStore, open_store
from engine.storage.logarchive import archive_logs, prune_log_archives, rotated_files
from engine.storage.service import DAY_S, StorageService
from engine.store.migrations import open_database


def rotate_some_logs(folder: Path, rounds: int = 3) -> list[bytes]:
    """Real RotatingFileHandler rotation, so names are what production produces."""
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(folder / "xswarm.log", maxBytes=2000, backupCount=5)
    logger = logging.getLogger(f"xswarm.test-rotation-{id(folder)}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(rounds * 30):
            logger.warning("line %04d %s", i, "x" * 60)
    finally:
        logger.removeHandler(handler)
        handler.close()
    return [p.read_bytes() for p in rotated_files(folder)]


def test_rotated_logs_are_archived_once_and_removed(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    contents = rotate_some_logs(folder)
    assert len(contents) >= 2 and (folder / "xswarm.log").exists()
    store = LocalStore(tmp_path / "objects")
    keys = archive_logs(store, folder, node_id="node a")
    assert len(keys) == len(contents) and all(k.startswith("logs/node_a/") and k.endswith(".log.gz") for k in keys)
    assert sorted(gzip.decompress(store.get_bytes(k)) for k in keys) == sorted(contents)
    assert rotated_files(folder) == [] and (folder / "xswarm.log").exists()  # the live file stays
    assert archive_logs(store, folder, node_id="node a") == []


def test_log_archive_retention(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    store.put_bytes("logs/n/2026-01-01/xswarm.log-a.log.gz", b"x")
    store.put_bytes("logs/n/2026-03-01/xswarm.log-b.log.gz", b"x")
    now = time.mktime((2026, 3, 2, 0, 0, 0, 0, 0, 0)) - time.timezone
    assert prune_log_archives(store, 30, now=now) == ["logs/n/2026-01-01/xswarm.log-a.log.gz"]


class MiniRuntime:
    """The attributes StorageService reads from the Runtime."""

    def __init__(self) -> None:
        self.settings = load_settings()
        self.bus = events.EventBus()
        self.seen: list[events.Event] = []
        self.bus.subscribe(self.seen.append)
        self.db = open_database(self.settings)
        self.node_id = "test-node"
        self.calls = {}  # type: ignore[var-annotated]


@pytest.mark.parametrize("where", ["local", "s3"])
async def test_rounds_back_up_daily_prune_and_archive(where: str, request: pytest.FixtureRequest) -> None:
    if where == "s3":
        request.getfixturevalue("s3_env")
    rotate_some_logs(resolve_paths().logs)
    runtime = MiniRuntime()
    try:
        service = StorageService(runtime, round_interval_s=3600)
        await service.start()
        for _ in range(400):  # the first round runs at start
            if service.rounds:
                break
            await asyncio.sleep(0.05)
        assert service.last_backup is not None
        store = open_store(load_settings())
        assert [i.key for i in store.list("backups/")] == [service.last_backup.key]
        assert store.list("logs/test-node/")
        first = service.last_backup.created_at
        again = await service.run_round(now=first + 3600)  # not due yet
        assert "backup" not in again
        later = await service.run_round(now=first + DAY_S + 1)
        assert later["backup"] == service.last_backup.id
        assert len(store.list("backups/")) == 2
        pruned = await service.run_round(now=first + 40 * DAY_S)
        assert len(pruned["backups_pruned"]) == 2 and len(store.list("backups/")) == 1  # a fresh one is kept
        assert service.status()["last_error"] is None
        await service.stop()
    finally:
        runtime.db.close()


async def test_unusable_bucket_is_reported_and_the_node_goes_on(
    s3_env: S3Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XSWARM_S3_BUCKET", "missing-bucket-for-service")
    runtime = MiniRuntime()
    try:
        service = StorageService(runtime)
        await service.start()  # must not raise
        errors = [e for e in runtime.seen if isinstance(e, events.ErrorRaised)]
        assert errors and errors[0].source == "storage" and "does not exist" in errors[0].message
        assert service.status()["store"] is None
        await service.stop()
    finally:
        runtime.db.close()


def test_spool_folder_is_not_in_the_store(tmp_path: Path) -> None:
    """The local store's own work folders never show up as objects."""
    store = LocalStore(tmp_path / "objects")
    store.put_bytes("a", b"1")
    (tmp_path / "objects" / ".tmp" / "stray").write_bytes(b"junk")
    os.makedirs(tmp_path / "objects" / "dir", exist_ok=True)
    (tmp_path / "objects" / "dir" / "orphan-without-meta").write_bytes(b"junk")
    assert [i.key for i in store.list()] == ["a"]
