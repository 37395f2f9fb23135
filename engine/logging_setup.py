"""Logging: one rotating file under ``<state>/logs/xswarm.log``, never the terminal.

The TUI owns the terminal, so engine code only ever logs (loggers named ``xswarm.<area>``);
``configure()`` sends those records to the file and, through ``add_mirror``, to anything else
that wants them (the TUI's log view). Secrets never reach a record: settings hold them as
``SecretStr``, and phones/emails are shortened with ``mask_phone``/``mask_email`` before they
are logged or shown.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import threading
from collections.abc import Callable
from multiprocessing.queues import Queue
from pathlib import Path

from engine.paths import Paths, resolve_paths

LOG_FILE = "xswarm.log"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 10
FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s"

_lock = threading.Lock()
_file_handler: logging.Handler | None = None


def _level() -> int:
    name = os.environ.get("XSWARM_LOG_LEVEL", "INFO").upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


def configure(paths: Paths | None = None) -> Path:
    """Send the ``xswarm`` loggers to the rotating file (once per process); returns its path.

    Level comes from ``XSWARM_LOG_LEVEL`` (default INFO). Records do not propagate to the root
    logger, so nothing a library configured there can print them on the terminal. The root
    logger gets the file too, so other libraries' warnings (aiohttp's "Error handling
    request", asyncio's) land there instead of on stderr through logging's last resort."""
    global _file_handler
    paths = paths or resolve_paths()
    folder = paths.logs
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_FILE
    logger = logging.getLogger("xswarm")
    with _lock:
        if _file_handler is not None and getattr(_file_handler, "baseFilename", None) == str(path):
            return path
        if _file_handler is not None:
            logger.removeHandler(_file_handler)
            logging.getLogger().removeHandler(_file_handler)
            _file_handler.close()
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.setLevel(_level())
        logger.addHandler(handler)
        logger.setLevel(min(_level(), logger.level or logging.CRITICAL))
        logger.propagate = False
        logging.getLogger().addHandler(handler)
        _file_handler = handler
    return path


def forward_to(records: Queue[logging.LogRecord]) -> None:
    """In a worker process: hand every record to the parent instead of opening the file.

    Why: several processes rotating one file lose lines (each renames the file under the
    others). The parent, which ran ``configure``, writes them all (``listen``)."""
    handler = logging.handlers.QueueHandler(records)
    logger = logging.getLogger("xswarm")
    logger.addHandler(handler)
    logger.setLevel(_level())
    logger.propagate = False
    logging.getLogger().addHandler(handler)


def listen(records: Queue[logging.LogRecord]) -> logging.handlers.QueueListener:
    """In the parent, after ``configure``: write the workers' records to the file (started;
    ``stop()`` it after the workers have exited)."""
    if _file_handler is None:
        raise RuntimeError("configure() first")
    listener = logging.handlers.QueueListener(records, _file_handler, respect_handler_level=True)
    listener.start()
    return listener


class _Mirror(logging.Handler):
    def __init__(self, sink: Callable[[logging.LogRecord, str], None], level: int) -> None:
        super().__init__(level)
        self.sink = sink
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink(record, self.format(record))
        except Exception:  # a broken view must never break the code that logged
            self.handleError(record)


def add_mirror(sink: Callable[[logging.LogRecord, str], None], level: int = logging.INFO) -> Callable[[], None]:
    """Also hand every ``xswarm`` record to ``sink(record, formatted_line)``; returns the
    remover. The sink runs in the logging thread: it must only hand the line on
    (``App.call_from_thread``, a queue), never block."""
    handler = _Mirror(sink, level)
    logger = logging.getLogger("xswarm")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)

    def remove() -> None:
        logger.removeHandler(handler)

    return remove


def mask_phone(phone: str | None) -> str:
    """``+14155550123`` -> ``+1415•••0123``: enough to tell callers apart, not to dial them."""
    if not phone:
        return "—"
    digits = phone.strip()
    if len(digits) <= 6:
        return "•" * len(digits)
    return digits[:5] + "•" * max(1, len(digits) - 9) + digits[-4:]


_PHONE = re.compile(r"\+\d{7,15}\b")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def mask_contacts(text: str) -> str:
    """Mask every E.164 phone number and email address inside free text.

    For text we did not write: a provider's error body (Twilio's 400 for a bad ``To`` quotes
    the number) ends up in the log and in the inbox's ``last_error``."""
    text = _PHONE.sub(lambda m: mask_phone(m.group()), text)
    return _EMAIL.sub(lambda m: mask_email(m.group()), text)


def mask_email(email: str | None) -> str:
    """``alice@example.com`` -> ``a••••@example.com``."""
    if not email:
        return "—"
    local, at, domain = email.strip().partition("@")
    if not at:
        return local[:1] + "•••"
    return (local[:1] + "•" * max(1, len(local) - 1)) + "@" + domain
