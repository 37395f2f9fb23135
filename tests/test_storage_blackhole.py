"""A storage endpoint that accepts TCP and never answers (issue 13, item 6).

Before: each call waited up to 5 × 60 s, eight mails with attachments filled the default
thread pool so mail without attachments went unanswered too, and ``xswarm backup create``
hung instead of printing its one-line error."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_webhooks import _multipart, db, fakes, make
from typer.testing import CliRunner
from webhooks_support import SendGridKey, post

from engine.store.db import Database
from xswarm_tui.cli import app

__all__ = ["db", "fakes", "make"]  # fixtures shared with test_webhooks


@pytest.fixture
def black_hole() -> Iterator[str]:
    """``http://127.0.0.1:<port>``: accepts every connection, reads, never writes a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, read_timeout_s: float) -> None:
    monkeypatch.setenv("XSWARM_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("XSWARM_S3_BUCKET", "backups")
    monkeypatch.setenv("XSWARM_S3_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("XSWARM_S3_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("XSWARM_S3__READ_TIMEOUT_S", str(read_timeout_s))


def test_backup_create_fails_with_one_line_against_a_black_hole(
    black_hole: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_env(monkeypatch, black_hole, 1.0)
    runner = CliRunner()
    assert runner.invoke(app, ["db", "migrate"]).exit_code == 0
    started = time.monotonic()
    result = runner.invoke(app, ["backup", "create"])
    took = time.monotonic() - started
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot reach bucket 'backups'" in result.stderr and "timeout" in result.stderr.lower()
    assert took < 10  # one attempt at the read timeout, not five


async def test_mail_without_attachments_is_answered_while_storage_hangs(
    db: Database, make: Any, black_hole: str
) -> None:
    key = SendGridKey()
    h = await make(
        sendgrid={"webhook_public_key": key.public_b64},
        s3={
            "endpoint_url": black_hole,
            "bucket": "mail",
            "access_key_id": "k",
            "secret_access_key": "s",
            "read_timeout_s": 5.0,
        },
    )

    def mail(n: int, files: list[tuple[str, str, bytes]]) -> tuple[bytes, dict[str, str]]:
        body, ctype = _multipart(
            {"from": "a@example.com", "text": "hi", "headers": f"Message-ID: <m{n}@example.com>\n"}, files
        )
        return body, {**key.headers(body), "Content-Type": ctype}

    stuck = [
        asyncio.create_task(post(h.session, h.base + "/sendgrid/inbound", *mail(n, [("a.bin", "x/y", b"1" * n)])))
        for n in range(1, 13)
    ]
    await asyncio.sleep(1.0)  # every attachment upload is now waiting on the black hole
    started = time.monotonic()
    status, _ = await post(h.session, h.base + "/sendgrid/inbound", *mail(100, []))
    assert status == 200 and time.monotonic() - started < 3
    for task in stuck:
        task.cancel()
    await asyncio.gather(*stuck, return_exceptions=True)
