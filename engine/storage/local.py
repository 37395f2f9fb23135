"""Object store in a local folder: the default when no bucket is configured.

Layout: ``<root>/<key>`` holds the bytes (so an operator can browse backups as plain files),
``<root>/.meta/<key>.json`` the size, sha256 and metadata, ``<root>/.tmp/`` uploads in
progress. An object exists only once its data file is renamed into place, and the metadata
is renamed first, so a crash at any point leaves either no object or a complete one
(an orphan metadata file is invisible: listings walk data files).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from engine.storage.base import (
    CHUNK,
    IntegrityError,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    Sink,
    StorageError,
    check_key,
)

_META = ".meta"
_TMP = ".tmp"


class LocalStore(ObjectStore):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"local folder {self.root}"

    def check(self) -> None:
        try:
            (self.root / _TMP).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot use {self.describe()}: {exc}") from exc

    def _data(self, key: str) -> Path:
        return self.root / check_key(key)

    def _meta(self, key: str) -> Path:
        return self.root / _META / f"{check_key(key)}.json"

    def _put(self, key: str, fileobj: BinaryIO, size: int, sha256: str, metadata: dict[str, str]) -> None:
        data, meta = self._data(key), self._meta(key)
        tmp_dir = self.root / _TMP
        try:
            for folder in (tmp_dir, data.parent, meta.parent):
                folder.mkdir(parents=True, exist_ok=True)
            data_tmp = self._write_temp(tmp_dir, fileobj.read, sha256)
            try:
                record = {"size": size, "sha256": sha256, "metadata": metadata}
                meta_tmp = self._write_temp(tmp_dir, _once(json.dumps(record).encode()), None)
                os.replace(meta_tmp, meta)
                os.replace(data_tmp, data)
            except BaseException:
                Path(data_tmp).unlink(missing_ok=True)
                raise
            _fsync_dir(data.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} to {self.describe()}: {exc}") from exc

    @staticmethod
    def _write_temp(folder: Path, read: Callable[[int], bytes], sha256: str | None) -> str:
        """Copy into a fresh temp file, fsync it, and check the bytes hash as announced."""
        fd, tmp = tempfile.mkstemp(dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                sink = Sink(out)
                while chunk := read(CHUNK):
                    sink.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if sha256 is not None and sink.hexdigest() != sha256:
                raise IntegrityError("source changed while it was being stored")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def _record(self, key: str) -> tuple[Path, dict[str, Any]]:
        data = self._data(key)
        try:
            record = json.loads(self._meta(key).read_text(encoding="utf-8"))
            stat = data.stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {key!r} in {self.describe()}: {exc}") from exc
        return data, {**record, "mtime": stat.st_mtime}

    def head(self, key: str) -> ObjectInfo:
        _, record = self._record(key)
        return ObjectInfo(key, record["size"], record["mtime"], record["sha256"], record["metadata"])

    def _download(self, key: str, sink: Sink) -> ObjectInfo:
        data, record = self._record(key)
        try:
            with open(data, "rb") as source:
                while chunk := source.read(CHUNK):
                    sink.write(chunk)
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} in {self.describe()}: {exc}") from exc
        return ObjectInfo(key, record["size"], record["mtime"], record["sha256"], record["metadata"])

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        if not self.root.exists():
            return found
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                key = Path(folder, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        found.append(self.head(key))
                    except (ObjectNotFound, ValueError):
                        continue  # deleted meanwhile, or a stray file that is not an object
        found.sort(key=lambda info: info.key)
        return found

    def delete(self, key: str) -> None:
        try:
            self._data(key).unlink(missing_ok=True)  # invisible from here on
            self._meta(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r} from {self.describe()}: {exc}") from exc


def _once(payload: bytes) -> Callable[[int], bytes]:
    """A ``read(n)`` that returns ``payload`` once, then end of file."""
    chunks = [payload]
    return lambda _n: chunks.pop() if chunks else b""


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
