"""Object storage: a local folder by default, S3/R2 when a bucket is configured.

``open_store(settings)`` picks one; everything else (backups, recordings, log archives) talks
to the ``ObjectStore`` interface and never knows which.
"""

from __future__ import annotations

from engine.config import Settings
from engine.paths import Paths, resolve_paths
from engine.storage.base import (
    IntegrityError,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageConfigError,
    StorageError,
)
from engine.storage.local import LocalStore

__all__ = [
    "IntegrityError",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "StorageConfigError",
    "StorageError",
    "open_store",
]


def open_store(settings: Settings, paths: Paths | None = None) -> ObjectStore:
    """The configured store: S3/R2 when ``s3.bucket`` is set, else ``<data>/storage``."""
    if settings.s3.bucket:
        from engine.storage.s3 import S3Store  # boto3 takes ~0.3 s to import; only when used

        return S3Store.from_settings(settings)
    if settings.s3.endpoint_url:
        raise StorageConfigError("XSWARM_S3_ENDPOINT_URL is set but XSWARM_S3_BUCKET is not")
    return LocalStore((paths or resolve_paths()).storage)
