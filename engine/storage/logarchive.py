"""Rotated log files (``xswarm.log.1`` … under ``<state>/logs``) gzipped into the store.

The rotating handler renames files as it goes (``.1`` becomes ``.2``), so names say nothing
lasting: each archive is keyed by the file's last-write time and content hash,
``logs/<node>/<YYYY-MM-DD>/<name>-<time>-<sha12>.log.gz``, which also makes a repeat upload
of the same file a no-op. gzip rather than zstd so ``zcat`` reads them anywhere. The local
file is deleted once archived, unless the handler has rotated a new file into its name meanwhile.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from engine.storage import codec
from engine.storage.base import ObjectStore
from engine.storage.retention import prune_dated

log = logging.getLogger("xswarm.storage")

PREFIX = "logs/"
_ROTATED = re.compile(r"^(?P<base>[\w.-]+?\.log)\.(?P<suffix>\d+|\d{4}-\d{2}-\d{2}(?:_\d{2}(?:-\d{2}){0,2})?)$")


def rotated_files(folder: Path) -> list[Path]:
    """Rotated (closed) log files, oldest first; the live ``xswarm.log`` is never among them."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and _ROTATED.match(p.name)]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def archive_logs(store: ObjectStore, folder: Path, *, node_id: str) -> list[str]:
    """Upload every rotated log file and delete the local copy; returns the keys written."""
    node = re.sub(r"[^A-Za-z0-9._-]", "_", node_id) or "node"
    written = []
    for path in rotated_files(folder):
        match = _ROTATED.match(path.name)
        assert match is not None
        try:
            with open(path, "rb") as source:
                before = os.fstat(source.fileno())
                with tempfile.TemporaryDirectory(prefix="logarchive-") as tmp:
                    packed = Path(tmp) / "packed.gz"
                    content_sha, size = codec.compress_stream("gzip", source, packed)
                    stamp = datetime.fromtimestamp(before.st_mtime, UTC)
                    name = f"{match['base']}-{stamp:%Y%m%dT%H%M%SZ}-{content_sha[:12]}.log.gz"
                    key = f"{PREFIX}{node}/{stamp:%Y-%m-%d}/{name}"
                    if not store.exists(key):
                        store.put_file(key, packed, {"node": node, "content-sha256": content_sha, "bytes": str(size)})
                        written.append(key)
            current = os.stat(path)
            if (current.st_ino, current.st_dev) == (before.st_ino, before.st_dev):
                path.unlink()
        except FileNotFoundError:
            continue  # rotated away or deleted meanwhile; the next round sees it under its new name
    if written:
        log.info("archived %d rotated log file(s) to %s", len(written), store.describe())
    return written


def prune_log_archives(store: ObjectStore, retention_days: int, *, now: float | None = None) -> list[str]:
    return prune_dated(store, PREFIX, retention_days, now=now)
