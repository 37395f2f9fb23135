"""The one interface every object store implements, and what they share.

Why a byte-level interface with our own sha256: local folders, S3 and R2 disagree on ETags
(multipart ETags are not content hashes) and on which checksum headers they honour, so every
object carries ``sha256`` of its bytes in its metadata, written at upload and checked on every
download before the bytes are handed over. A download lands in a temp file next to its
destination and is renamed into place only after the check, so a corrupt or half-downloaded
object never looks like a good file.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from engine.files import atomic_file

CHUNK = 1024 * 1024
T = TypeVar("T")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-=+/]*$")
_META_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class StorageError(Exception):
    """An object-store operation failed; the message is meant for the operator as is."""


class StorageConfigError(StorageError):
    """The store cannot be used as configured (bad credentials, missing bucket, bad endpoint)."""


class ObjectNotFound(StorageError):
    """No object under that key."""


class IntegrityError(StorageError):
    """The bytes read back do not match the checksum recorded when they were written."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float
    """Unix seconds of the last write."""
    sha256: str | None = None
    metadata: dict[str, str] | None = field(default=None)
    """User metadata; ``None`` when the listing did not fetch it (S3 listings don't)."""


def check_key(key: str) -> str:
    """Reject keys that could escape a folder or mean different things on different stores."""
    if not isinstance(key, str) or not key or len(key.encode()) > 1024 or not _KEY.match(key):
        raise ValueError(f"invalid object key {key!r}")
    if any(part in ("", ".", "..") or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}: empty or dot-leading path segment")
    return key


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """S3 user metadata is case-insensitive ASCII with a ~2 KB budget; hold every store to that."""
    out: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        if not _META_NAME.match(name):
            raise ValueError(f"invalid metadata name {name!r} (lowercase letters, digits, '-')")
        if not isinstance(value, str) or not value.isascii() or any(c in value for c in "\r\n"):
            raise ValueError(f"metadata {name!r} must be a one-line ASCII string")
        out[name] = value
    if sum(len(k) + len(v) for k, v in out.items()) > 1900:
        raise ValueError("metadata too large (S3 allows about 2 KB)")
    return out


def sha256_of(fileobj: BinaryIO) -> tuple[str, int]:
    """Hash a seekable file from its start; returns (hex digest, size) and rewinds it."""
    fileobj.seek(0)
    digest = hashlib.sha256()
    size = 0
    while chunk := fileobj.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    fileobj.seek(0)
    return digest.hexdigest(), size


class Sink:
    """Where a download writes: hashes as it goes and can start over after a dropped connection."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.fileobj = fileobj
        self.reset()

    def reset(self) -> None:
        self.fileobj.seek(0)
        self.fileobj.truncate()
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.fileobj.write(chunk)
        self._digest.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class ObjectStore(ABC):
    """put/get/head/list/delete over whole objects, each with a verified sha256.

    Writes are all-or-nothing: a reader sees the old object, or the new one complete, never a
    part. Every method blocks; the ``a``-prefixed twins run it on a worker thread so an event
    loop never waits on disk or network.
    """

    @abstractmethod
    def describe(self) -> str:
        """Where the objects live, safe to show (no secrets)."""

    @abstractmethod
    def _put(self, key: str, fileobj: BinaryIO, size: int, sha256: str, metadata: dict[str, str]) -> None:
        """Store ``size`` bytes from the seekable ``fileobj`` (at offset 0) atomically."""

    @abstractmethod
    def _download(self, key: str, sink: Sink) -> ObjectInfo:
        """Write the object's bytes into ``sink``; return its info (with the recorded sha256)."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """The object's size, time, checksum and metadata; ``ObjectNotFound`` if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every complete object whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error."""

    def check(self) -> None:  # noqa: B027 - an optional hook
        """Raise ``StorageConfigError`` if the store cannot be used (called at service start)."""

    # ------------------------------------------------------------------------ shared parts

    def put_file(self, key: str, path: Path | str, metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        check_key(key)
        meta = check_metadata(metadata)
        with open(path, "rb") as fileobj:
            digest, size = sha256_of(fileobj)
            self._put(key, fileobj, size, digest, meta)
        return ObjectInfo(key, size, time.time(), digest, meta)

    def put_bytes(self, key: str, data: bytes, metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        check_key(key)
        meta = check_metadata(metadata)
        digest = hashlib.sha256(data).hexdigest()
        self._put(key, io.BytesIO(data), len(data), digest, meta)
        return ObjectInfo(key, len(data), time.time(), digest, meta)

    def get_file(self, key: str, dest: Path | str) -> ObjectInfo:
        """Download to ``dest`` atomically: a temp file beside it, checked, then renamed."""
        check_key(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(dest) as fileobj:
            return self._verified(key, Sink(fileobj))

    def get_bytes(self, key: str) -> bytes:
        check_key(key)
        buffer = io.BytesIO()
        self._verified(key, Sink(buffer))
        return buffer.getvalue()

    def _verified(self, key: str, sink: Sink) -> ObjectInfo:
        info = self._download(key, sink)
        if info.sha256 is not None and sink.hexdigest() != info.sha256:
            raise IntegrityError(
                f"object {key!r} in {self.describe()} is corrupt: sha256 {sink.hexdigest()[:16]}… "
                f"does not match the recorded {info.sha256[:16]}…"
            )
        if sink.size != info.size:
            raise IntegrityError(f"object {key!r}: read {sink.size} bytes, expected {info.size}")
        return info

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    # ---------------------------------------------------------------- async (off the loop)

    async def aput_file(self, key: str, path: Path | str, metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        return await off_loop(self.put_file, key, path, metadata)


STORAGE_THREADS = 4
_pool = ThreadPoolExecutor(STORAGE_THREADS, thread_name_prefix="xswarm-storage")


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking object-store work on storage's own pool of ``STORAGE_THREADS`` threads,
    never on the loop's default executor. Why: against an endpoint that accepts connections
    and never answers, each call holds its thread for up to the read timeout times the
    attempts; eight mails with attachments once filled the shared default pool, which also
    parses every mail, so mail without attachments went unanswered too. Here a hanging store
    queues only storage work."""
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(fn, *args, **kwargs))
