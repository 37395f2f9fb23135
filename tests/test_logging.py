"""Logging goes to the rotating file only; the TUI can mirror records; phones/emails are masked."""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_http import start_local_app

from engine import logging_setup
from engine.logging_setup import add_mirror, configure, mask_contacts, mask_email, mask_phone


@pytest.fixture(autouse=True)
def fresh_logger() -> Iterator[None]:
    """Each test configures the ``xswarm`` logger from scratch and leaves it as it was."""
    logger, root = logging.getLogger("xswarm"), logging.getLogger()
    saved = (list(logger.handlers), logger.level, logger.propagate, logging_setup._file_handler)
    saved_root = list(root.handlers)
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logging_setup._file_handler = None
    yield
    for handler in {*logger.handlers, *root.handlers}:
        if handler not in saved[0] and handler not in saved_root:
            handler.close()
    root.handlers[:] = saved_root
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    logging_setup._file_handler = saved[3]


def test_records_go_to_the_rotating_file_and_never_the_terminal(
    xswarm_home: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = configure()
    assert path == xswarm_home / "state" / "logs" / "xswarm.log"
    assert configure() == path  # idempotent: still one handler
    handlers = logging.getLogger("xswarm").handlers
    assert len(handlers) == 1 and isinstance(handlers[0], logging.handlers.RotatingFileHandler)
    assert handlers[0].maxBytes == 10 * 1024 * 1024 and handlers[0].backupCount == 10
    logging.getLogger("xswarm.store").warning("disk nearly full at %s", "/data")
    logging.getLogger("xswarm.store").debug("not at INFO")
    handlers[0].flush()
    text = path.read_text()
    assert "WARNING xswarm.store" in text and "disk nearly full at /data" in text and "not at INFO" not in text
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_level_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XSWARM_LOG_LEVEL", "debug")
    path = configure()
    logging.getLogger("xswarm.bridge").debug("frame details")
    logging.getLogger("xswarm").handlers[0].flush()
    assert "frame details" in path.read_text()


def test_mirror_hook_receives_formatted_records_until_removed() -> None:
    configure()
    seen: list[tuple[int, str]] = []
    remove = add_mirror(lambda record, line: seen.append((record.levelno, line)))
    logging.getLogger("xswarm.tui").info("call %s started", "CA1")
    remove()
    logging.getLogger("xswarm.tui").info("after removal")
    assert (
        len(seen) == 1
        and seen[0][0] == logging.INFO
        and "xswarm.tui" in seen[0][1]
        and "call CA1 started" in seen[0][1]
    )


def test_a_broken_mirror_never_breaks_the_caller(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    configure()
    monkeypatch.setattr(logging, "raiseExceptions", False)  # what a production process runs with

    def broken(record: logging.LogRecord, line: str) -> None:
        raise RuntimeError("view gone")

    remove = add_mirror(broken)
    logging.getLogger("xswarm.x").error("still fine")
    remove()
    logging.getLogger("xswarm").handlers[0].flush()
    assert "still fine" in (
        logging_setup._file_handler.baseFilename and Path(logging_setup._file_handler.baseFilename).read_text()
    )  # type: ignore[union-attr]
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("phone", "masked"),
    [("+14155550123", "+1415•••0123"), ("+447911123456", "+4479••••3456"), ("+3312", "•••••"), (None, "—"), ("", "—")],
)
def test_mask_phone(phone: str | None, masked: str) -> None:
    assert mask_phone(phone) == masked


@pytest.mark.parametrize(
    ("email", "masked"),
    [("alice@example.com", "a••••@example.com"), ("b@x.io", "b•@x.io"), ("not-an-email", "n•••"), (None, "—")],
)
def test_mask_email(email: str | None, masked: str) -> None:
    assert mask_email(email) == masked


def test_mask_contacts_masks_every_phone_and_email_in_free_text() -> None:
    text = "The 'To' number +15005550001 is not valid; copy ada.l+x@mail.example.co.uk; order 12345678 +1"
    masked = mask_contacts(text)
    assert "+15005550001" not in masked and "+1500•••0001" in masked
    assert "ada.l+x@" not in masked and "a••••••@mail.example.co.uk" in masked
    assert masked.endswith("order 12345678 +1")  # digits without a '+' and short '+N' stay as they are


async def test_a_providers_error_body_is_masked_before_it_is_logged_or_stored() -> None:
    """Twilio's 400 quotes the number it refused; TwilioError's text goes to the log and last_error."""
    import aiohttp
    from aiohttp import web

    from engine.config import TwilioSettings
    from engine.telephony.twilio_rest import TwilioClient, TwilioError

    async def refuse(request: web.Request) -> web.Response:
        number = (await request.post())["To"]
        return web.json_response(
            {"code": 21211, "message": f"The 'To' number {number} is not a valid phone number."}, status=400
        )

    runner, port = await start_local_app(web.post("/2010-04-01/Accounts/{account}/Messages.json", refuse))
    try:
        async with aiohttp.ClientSession() as session:
            settings = TwilioSettings(account_sid="AC1", auth_token="token", api_base=f"http://127.0.0.1:{port}")
            rest = TwilioClient(settings, session)
            with pytest.raises(TwilioError) as info:
                await rest.send_sms(to="+15005550001", from_="+14155550100", body="hi")
    finally:
        await runner.cleanup()
    assert "answered 400" in str(info.value) and "21211" in str(info.value)
    assert "+15005550001" not in str(info.value) and "+1500•••0001" in str(info.value)


def test_other_libraries_warnings_land_in_the_file_not_on_stderr(
    xswarm_home: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = configure()
    logging.getLogger("aiohttp.server").error("Error handling request from %s", "127.0.0.1")
    logging.getLogger("aiohttp.access").info("below the root's WARNING: not written")
    logging.getLogger("xswarm").handlers[0].flush()
    text = path.read_text()
    assert "ERROR   aiohttp.server" in text and "Error handling request from 127.0.0.1" in text
    assert "below the root" not in text
    out, err = capfd.readouterr()
    assert out == "" and err == ""
