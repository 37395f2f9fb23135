"""What every command needs: settings or a clean exit, the database or a clean exit.

Operators see one line on stderr and an exit code (2: bad configuration or input, 1: the
command could not be done), never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from engine.config import Settings
    from engine.store.db import Database

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    typer.echo(f"xswarm: {message}", err=True)
    raise typer.Exit(code)


def load() -> Settings:
    """The settings, or exit 2 naming the bad key."""
    from engine.config import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


@contextmanager
def database(settings: Settings | None = None) -> Iterator[Database]:
    """The started, migrated database; unreachable or failing stores exit 1 with the reason."""
    from engine.store.db import StoreError
    from engine.store.migrations import open_database

    settings = settings or load()
    try:
        db = open_database(settings)
    except StoreError as exc:
        fail(str(exc))
    try:
        yield db
    except StoreError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    finally:
        db.close()


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"xswarm {version('xswarm')}")
        raise typer.Exit()


VERSION_OPTION = typer.Option(
    False, "--version", callback=_print_version, is_eager=True, help="Print `xswarm <version>` and exit."
)
"""The root's ``--version`` (eager: it answers before settings or the console are touched)."""
