"""Writing a file so that readers see the old contents or the new, never half of either."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A temp file beside ``path`` (created 0600, open for reading and writing) that replaces
    ``path`` once the block ends, flushed to disk. A failure in the block, a crash or a full
    disk leaves the old file and no temp file."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through ``atomic_file``."""
    with atomic_file(path) as fh:
        fh.write(data)
