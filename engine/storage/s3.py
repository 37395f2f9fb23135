"""S3-compatible object store (Cloudflare R2, AWS S3, moto in tests) through boto3.

Every call blocks, so the runtime reaches it through the ``a``-methods (a worker thread).
Retries come in two layers: botocore's own (``standard`` mode: connection errors, throttling,
5xx, with the body rewound) for single requests, and ours around each multipart part, the
completion and a whole download, because those span many requests.

Atomicity: a single PUT is atomic on S3; a multipart upload is invisible until
``CompleteMultipartUpload``, and is aborted on any failure so no parts linger (and bill).
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, BinaryIO, TypeVar

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from engine.config import Settings, secret
from engine.storage.base import (
    CHUNK,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    Sink,
    StorageConfigError,
    StorageError,
)

log = logging.getLogger("xswarm.storage")
T = TypeVar("T")
MiB = 1024 * 1024
_MAX_PARTS = 10_000

_NETWORK = (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError, OSError)
_TRANSIENT_CODES = {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "503", "500"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "InvalidToken",
    "ExpiredToken",
    "Unauthorized",
    "401",
}


class S3Store(ObjectStore):
    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "auto",
        prefix: str = "",
        part_size: int = 8 * MiB,
        multipart_threshold: int = 16 * MiB,
        concurrency: int = 4,
        max_attempts: int = 5,
        part_attempts: int = 5,
    ) -> None:
        """``max_attempts``: botocore's per-request attempts; ``part_attempts``: ours, per part,
        completion and whole download."""
        if part_size < 5 * MiB:
            raise ValueError("S3 parts must be at least 5 MiB")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.concurrency = concurrency
        self.part_attempts = part_attempts
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path"} if endpoint_url else {},
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=concurrency + 4,
            # R2 and other S3-compatibles reject the CRC trailers botocore now adds by default;
            # our sha256 metadata and Content-MD5 per part do that job everywhere.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        s3 = settings.s3
        if not s3.bucket:
            raise StorageConfigError("XSWARM_S3_BUCKET is not set")
        return cls(
            bucket=s3.bucket,
            endpoint_url=s3.endpoint_url,
            access_key_id=secret(s3.access_key_id),
            secret_access_key=secret(s3.secret_access_key),
            region=s3.region,
            prefix=s3.prefix,
        )

    def describe(self) -> str:
        where = self.endpoint_url or "AWS S3"
        return f"bucket '{self.bucket}' at {where}" + (f" (prefix '{self.prefix}')" if self.prefix else "")

    def _full(self, key: str) -> str:
        return self.prefix + key

    # ------------------------------------------------------------------------- errors

    def _error(self, exc: Exception, what: str) -> StorageError:
        """Turn botocore's many exception types into one message an operator can act on."""
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, bex.NoCredentialsError):
            return StorageConfigError(
                f"no S3 credentials for {self.describe()}: set XSWARM_S3_ACCESS_KEY_ID and XSWARM_S3_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, bex.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return StorageConfigError(
                    f"{self.describe()} does not exist: create the bucket or fix XSWARM_S3_BUCKET"
                )
            if code in _CREDENTIAL_CODES:
                return StorageConfigError(
                    f"S3 credentials rejected ({code}) by {self.describe()}: check "
                    "XSWARM_S3_ACCESS_KEY_ID, XSWARM_S3_SECRET_ACCESS_KEY and the bucket's permissions"
                )
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"no object for {what} in {self.describe()}")
            return StorageError(f"S3 {what} failed ({code}): {exc}")
        if isinstance(exc, _NETWORK):
            return StorageError(f"cannot reach {self.describe()} for {what}: {exc}")
        return StorageError(f"S3 {what} failed: {exc}")

    def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        try:
            return fn(**kwargs)
        except Exception as exc:
            raise self._error(exc, what) from exc

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Our retry layer for multi-request operations (botocore retries single requests)."""
        for attempt in range(1, self.part_attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not _transient(exc) or attempt == self.part_attempts:
                    raise self._error(exc, what) from exc
                delay = min(0.2 * 2 ** (attempt - 1), 5.0)
                log.warning(
                    "%s failed (%s), attempt %d/%d; retrying in %.1fs", what, exc, attempt, self.part_attempts, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def check(self) -> None:
        """HEAD the bucket: tells a missing bucket from rejected credentials before any upload."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except bex.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageConfigError(
                    f"{self.describe()} does not exist: create the bucket or fix XSWARM_S3_BUCKET"
                ) from exc
            raise self._error(exc, "bucket check") from exc
        except Exception as exc:
            raise self._error(exc, "bucket check") from exc

    # -------------------------------------------------------------------------- writes

    def _put(self, key: str, fileobj: BinaryIO, size: int, sha256: str, metadata: dict[str, str]) -> None:
        meta = {**metadata, "sha256": sha256}
        if size < self.multipart_threshold:
            fileobj.seek(0)
            self._call(
                f"upload of {key!r}",
                self._client.put_object,
                Bucket=self.bucket,
                Key=self._full(key),
                Body=fileobj,
                ContentLength=size,
                ContentMD5=_md5_of(fileobj),
                Metadata=meta,
            )
            return
        self._multipart(key, fileobj, size, sha256, meta)

    def _multipart(self, key: str, fileobj: BinaryIO, size: int, sha256: str, meta: dict[str, str]) -> None:
        full = self._full(key)
        created = self._call(
            f"upload of {key!r}",
            self._client.create_multipart_upload,
            Bucket=self.bucket,
            Key=full,
            Metadata=meta,
        )
        upload_id = created["UploadId"]
        lock = threading.Lock()
        part_size = max(self.part_size, -(-size // _MAX_PARTS))  # S3 allows at most 10,000 parts

        def send(number: int) -> dict[str, Any]:
            offset = (number - 1) * part_size
            with lock:  # one shared file handle: read the part, then upload outside the lock
                fileobj.seek(offset)
                body = fileobj.read(min(part_size, size - offset))
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()

            def once() -> dict[str, Any]:
                return self._client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body, ContentMD5=md5
                )

            response = self._retrying(f"part {number} of {key!r}", once)
            return {"PartNumber": number, "ETag": response["ETag"]}

        count = -(-size // part_size)
        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="xswarm-s3-part") as pool:
                parts = list(pool.map(send, range(1, count + 1)))
            self._complete(key, upload_id, parts, sha256)
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception as exc:  # the bucket's lifecycle rule is the last line of defence
                log.error("could not abort multipart upload %s of %r: %s", upload_id, key, exc)
            raise

    def _complete(self, key: str, upload_id: str, parts: list[dict[str, Any]], sha256: str) -> None:
        def once() -> None:
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self._full(key), UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
            except bex.ClientError as exc:
                # A retry after a lost response: the upload is gone because it completed.
                if exc.response.get("Error", {}).get("Code") == "NoSuchUpload" and self._has(key, sha256):
                    return
                raise

        self._retrying(f"completion of {key!r}", once)

    def _has(self, key: str, sha256: str) -> bool:
        try:
            return self.head(key).sha256 == sha256
        except StorageError:
            return False

    # --------------------------------------------------------------------------- reads

    def head(self, key: str) -> ObjectInfo:
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except bex.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NotFound", "NoSuchKey"):
                self.check()  # a HEAD 404 cannot tell a missing bucket from a missing key
                raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None
            raise self._error(exc, f"lookup of {key!r}") from exc
        except Exception as exc:
            raise self._error(exc, f"lookup of {key!r}") from exc
        return _info(key, response)

    def _download(self, key: str, sink: Sink) -> ObjectInfo:
        def once() -> ObjectInfo:
            sink.reset()
            response = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
            for chunk in response["Body"].iter_chunks(CHUNK):
                sink.write(chunk)
            return _info(key, response)

        try:
            return self._retrying(f"download of {key!r}", once)
        except ObjectNotFound:
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._full(prefix)
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) :]
                    found.append(ObjectInfo(key, int(item["Size"]), item["LastModified"].timestamp()))
        except Exception as exc:
            raise self._error(exc, f"listing of {prefix!r}") from exc
        found.sort(key=lambda info: info.key)
        return found

    def delete(self, key: str) -> None:
        self._call(f"deletion of {key!r}", self._client.delete_object, Bucket=self.bucket, Key=self._full(key))

    def pending_uploads(self) -> builtins.list[str]:  # `list` here is the method above
        """Keys of multipart uploads started and neither completed nor aborted (for checks)."""
        response = self._call(
            "listing of uploads", self._client.list_multipart_uploads, Bucket=self.bucket, Prefix=self.prefix
        )
        return [u["Key"][len(self.prefix) :] for u in response.get("Uploads", [])]


def _transient(exc: Exception) -> bool:
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return str(error.get("Code")) in _TRANSIENT_CODES or status >= 500
    return isinstance(exc, _NETWORK)


def _info(key: str, response: dict[str, Any]) -> ObjectInfo:
    metadata = {k.lower(): v for k, v in response.get("Metadata", {}).items()}
    modified = response.get("LastModified")
    return ObjectInfo(
        key=key,
        size=int(response["ContentLength"]),
        modified=modified.timestamp() if isinstance(modified, datetime) else 0.0,
        sha256=metadata.pop("sha256", None),
        metadata=metadata,
    )


def _md5_of(fileobj: BinaryIO) -> str:
    """Content-MD5 for a single PUT: the server refuses bytes damaged on the way."""
    digest = hashlib.md5()
    fileobj.seek(0)
    while chunk := fileobj.read(CHUNK):
        digest.update(chunk)
    fileobj.seek(0)
    return base64.b64encode(digest.digest()).decode()
