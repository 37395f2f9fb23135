"""Object stores against a real folder and a real S3 server (moto on 127.0.0.1)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.s3 import S3Target

from engine.config import load_settings
from engine.storage import (
    IntegrityError,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    StorageConfigError,
    StorageError,
    open_store,
)
from engine.storage.s3 import S3Store

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    target: S3Target = request.getfixturevalue("s3_bucket")
    return target.store(part_size=5 * MiB, multipart_threshold=5 * MiB)


def test_round_trip_bytes_and_metadata(store: ObjectStore) -> None:
    info = store.put_bytes("backups/one.bin", b"\x00hello\xff", {"schema-version": "3"})
    assert info.size == 7
    assert store.get_bytes("backups/one.bin") == b"\x00hello\xff"
    head = store.head("backups/one.bin")
    assert head.sha256 == info.sha256 and head.metadata == {"schema-version": "3"} and head.size == 7
    assert [i.key for i in store.list("backups/")] == ["backups/one.bin"]
    assert store.list("recordings/") == []
    store.delete("backups/one.bin")
    store.delete("backups/one.bin")  # idempotent
    assert not store.exists("backups/one.bin")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("backups/one.bin")


def test_multipart_round_trip_to_file(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    payload = os.urandom(12 * MiB + 12345)  # 3 parts of 5 MiB on S3
    source.write_bytes(payload)
    info = store.put_file("backups/big.bin", source, {"kind": "test"})
    dest = tmp_path / "out" / "big.bin"
    got = store.get_file("backups/big.bin", dest)
    assert dest.read_bytes() == payload
    assert got.sha256 == info.sha256 and got.size == len(payload)
    assert not [p for p in dest.parent.iterdir() if p.name.endswith(".part")]
    if isinstance(store, S3Store):
        assert store.pending_uploads() == []


def test_corruption_detected_and_nothing_written(
    store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store.put_bytes("backups/c.bin", b"A" * 1000)
    if isinstance(store, LocalStore):
        path = store.root / "backups" / "c.bin"
        data = bytearray(path.read_bytes())
        data[500] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        target: S3Target = request.getfixturevalue("s3_bucket")
        # Replace the bytes behind the store's back but keep the recorded checksum.
        sha = store.head("backups/c.bin").sha256
        target.client().put_object(
            Bucket=target.bucket, Key="backups/c.bin", Body=b"B" * 1000, Metadata={"sha256": sha}
        )
    dest = tmp_path / "restored.bin"
    with pytest.raises(IntegrityError, match="corrupt"):
        store.get_file("backups/c.bin", dest)
    assert not dest.exists()
    assert list(tmp_path.glob("*.part")) == []


def test_keys_and_metadata_are_checked(store: ObjectStore) -> None:
    for bad in ("", "/abs", "a/../b", ".meta/x", "a//b", "sp ace"):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"x")
    with pytest.raises(ValueError):
        store.put_bytes("k", b"x", {"Bad_Name": "v"})
    with pytest.raises(ValueError):
        store.put_bytes("k", b"x", {"ok": "line\nbreak"})


class _Exploding(io.RawIOBase):
    """A source that fails after some bytes, like a disk error mid-upload."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        self.data, self.fail_at, self.pos, self.armed = data, fail_at, 0, False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.armed and self.pos >= self.fail_at:
            raise OSError("disk went away")
        chunk = self.data[self.pos : self.pos + min(len(buffer), 256 * 1024)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def test_failed_write_leaves_no_object(store: ObjectStore) -> None:
    data = os.urandom(11 * MiB)
    source = _Exploding(data, fail_at=7 * MiB)
    import hashlib

    source.armed = True  # hashing already done by the caller below; the copy itself fails
    with pytest.raises((StorageError, OSError)):
        store._put("backups/partial.bin", source, len(data), hashlib.sha256(data).hexdigest(), {})  # type: ignore[arg-type]
    assert store.list("backups/") == []
    assert not store.exists("backups/partial.bin")
    if isinstance(store, S3Store):
        assert store.pending_uploads() == []  # the multipart upload was aborted
    else:
        assert list((store.root / ".tmp").iterdir()) == []


def test_missing_bucket_is_a_clear_error(moto_endpoint: str) -> None:
    store = S3Target(moto_endpoint, "no-such-bucket-here").store()
    with pytest.raises(StorageConfigError, match="'no-such-bucket-here'.*does not exist"):
        store.check()
    with pytest.raises(StorageConfigError, match="does not exist"):
        store.put_bytes("k", b"x")
    with pytest.raises(StorageConfigError, match="does not exist"):
        store.head("k")
    with pytest.raises(StorageConfigError, match="does not exist"):
        store.list()


def test_rejected_credentials_are_a_clear_error(moto_auth_endpoint: str) -> None:
    store = S3Target(
        moto_auth_endpoint, "any-bucket", access_key_id="AKIANOTAREALKEY", secret_access_key="nope"
    ).store()
    for attempt in (store.check, lambda: store.put_bytes("k", b"x"), store.list, lambda: store.get_bytes("k")):
        with pytest.raises(StorageConfigError, match="credentials rejected.*XSWARM_S3_ACCESS_KEY_ID"):
            attempt()


def test_unreachable_endpoint_is_a_clear_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    store = S3Store(
        bucket="b", endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s", max_attempts=2
    )
    with pytest.raises(StorageError, match="cannot reach"):
        store.put_bytes("k", b"x")


@pytest.mark.parametrize("botocore_attempts", [5, 1])
def test_connection_reset_mid_multipart_is_retried(
    s3_bucket: S3Target, flaky_proxy: Callable[..., object], tmp_path: Path, botocore_attempts: int
) -> None:
    """With botocore's retries off (1 attempt), our own per-part retry must carry the upload."""
    proxy = flaky_proxy(after_bytes=2 * MiB, drops=1)
    store = S3Target(proxy.endpoint_url, s3_bucket.bucket).store(  # type: ignore[attr-defined]
        part_size=5 * MiB, multipart_threshold=5 * MiB, max_attempts=botocore_attempts, part_attempts=3
    )
    payload = os.urandom(11 * MiB)
    source = tmp_path / "p.bin"
    source.write_bytes(payload)
    store.put_file("backups/retried.bin", source)
    assert proxy.dropped == 1  # type: ignore[attr-defined]
    assert s3_bucket.store().get_bytes("backups/retried.bin") == payload
    assert s3_bucket.store().pending_uploads() == []


def test_connection_reset_on_single_put_is_retried(s3_bucket: S3Target, flaky_proxy: Callable[..., object]) -> None:
    proxy = flaky_proxy(after_bytes=64 * 1024, drops=1)
    store = S3Target(proxy.endpoint_url, s3_bucket.bucket).store()  # type: ignore[attr-defined]
    payload = os.urandom(1 * MiB)
    store.put_bytes("small.bin", payload)
    assert proxy.dropped == 1  # type: ignore[attr-defined]
    assert store.get_bytes("small.bin") == payload


def test_connection_reset_mid_download_is_retried(
    s3_bucket: S3Target, flaky_proxy: Callable[..., object], tmp_path: Path
) -> None:
    payload = os.urandom(3 * MiB)
    s3_bucket.store().put_bytes("down.bin", payload)
    proxy = flaky_proxy(after_bytes=1 * MiB, drops=1, direction="download")
    store = S3Target(proxy.endpoint_url, s3_bucket.bucket).store()  # type: ignore[attr-defined]
    got = store.get_file("down.bin", tmp_path / "down.bin")
    assert proxy.dropped == 1  # type: ignore[attr-defined]
    assert (tmp_path / "down.bin").read_bytes() == payload and got.size == len(payload)


def test_upload_that_keeps_failing_leaves_nothing_visible(
    s3_bucket: S3Target, flaky_proxy: Callable[..., object], tmp_path: Path
) -> None:
    proxy = flaky_proxy(after_bytes=1 * MiB, drops=float("inf"))
    store = S3Target(proxy.endpoint_url, s3_bucket.bucket).store(  # type: ignore[attr-defined]
        part_size=5 * MiB, multipart_threshold=5 * MiB, max_attempts=2, part_attempts=2
    )
    source = tmp_path / "p.bin"
    source.write_bytes(os.urandom(11 * MiB))
    seen: list[list[str]] = []
    stop = threading.Event()
    observer = s3_bucket.store()

    def watch() -> None:
        while not stop.is_set():
            seen.append([i.key for i in observer.list()])

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        with pytest.raises(StorageError, match="cannot reach|failed"):
            store.put_file("backups/never.bin", source)
    finally:
        stop.set()
        thread.join()
    assert seen and all(keys == [] for keys in seen)
    assert observer.list() == [] and observer.pending_uploads() == []


def test_open_store_follows_the_environment(
    s3_env: S3Target, monkeypatch: pytest.MonkeyPatch, xswarm_home: Path
) -> None:
    store = open_store(load_settings())
    assert isinstance(store, S3Store) and store.bucket == s3_env.bucket
    store.check()
    for name in s3_env.env():
        monkeypatch.delenv(name)
    local = open_store(load_settings())
    assert isinstance(local, LocalStore) and local.root == xswarm_home / "data" / "storage"
    monkeypatch.setenv("XSWARM_S3_ENDPOINT_URL", s3_env.endpoint_url)
    with pytest.raises(StorageConfigError, match="XSWARM_S3_BUCKET"):
        open_store(load_settings())


def test_region_auto_bucket_trap_is_real(moto_endpoint: str) -> None:
    """Why the fixture passes a LocationConstraint: without it, region auto is refused."""
    client = S3Target(moto_endpoint, "x").client()
    with pytest.raises(Exception, match="IllegalLocationConstraint"):
        client.create_bucket(Bucket="trap-bucket")


async def test_async_upload_runs_off_the_loop(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "x.bin"
    source.write_bytes(b"123")
    info = await store.aput_file("a/x", source)
    assert info.size == 3
    assert [i.key for i in store.list("a/")] == ["a/x"]
