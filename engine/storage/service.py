"""Storage inside the runtime: the daily backup, retention, log archives and call recordings.

The runtime builds ``StorageService(runtime)`` and awaits ``start()``/``stop()`` on its loop.
Everything slow (VACUUM INTO, compression, uploads) runs on worker threads, so the 80 ms tick
on the same loop never waits for it. A store that cannot be used (missing bucket, rejected
credentials) is reported once on the bus as ``ErrorRaised`` and the node keeps serving calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from engine import events
from engine.host import RuntimeHost
from engine.paths import resolve_paths
from engine.storage import ObjectStore, StorageError, open_store
from engine.storage.backup import (
    Backup,
    BackupError,
    create_backup,
    latest_backup_time,
    prune_backups,
)
from engine.storage.base import off_loop
from engine.storage.logarchive import archive_logs, prune_log_archives
from engine.storage.recordings import CallRecordings, prune_recordings
from engine.tasks import cancel_and_wait

if TYPE_CHECKING:
    from engine.store.db import Database

log = logging.getLogger("xswarm.storage")

DAY_S = 86400.0


class StorageHost(RuntimeHost, Protocol):
    """What the storage service uses of the runtime."""

    @property
    def db(self) -> Database | None: ...


class StorageService:
    def __init__(self, runtime: StorageHost, *, round_interval_s: float = 3600.0) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.round_interval_s = round_interval_s
        """How often to look at what is due (the backup itself is daily)."""
        self.store: ObjectStore | None = None
        self.recordings: CallRecordings | None = None
        self.last_backup: Backup | None = None
        self.last_backup_at: float | None = None
        self.last_error: str | None = None
        self.rounds = 0
        """Rounds completed (the first runs at start)."""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self.store = await off_loop(self._open)
        except (StorageError, ValueError) as exc:
            self._report(f"object storage unavailable: {exc}")
            return
        loop = asyncio.get_running_loop()
        if self.settings.recording.enabled:
            self.recordings = CallRecordings(
                bus=self.runtime.bus,
                loop=loop,
                sessions=self.runtime.calls.get,
                consent=self._consent,
                store=self.store,
                spool=resolve_paths().cache / "recordings",
            )
            self.recordings.start()
        self._task = loop.create_task(self._rounds(), name="xswarm-storage")

    def _open(self) -> ObjectStore:
        store = open_store(self.settings)
        store.check()
        self.last_backup_at = latest_backup_time(store)
        return store

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self.recordings is not None:
            await self.recordings.stop()

    async def _rounds(self) -> None:
        while True:
            try:
                await self.run_round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad round must not end the schedule
                log.exception("storage round failed")
                self._report(f"storage round failed: {exc}")
            await asyncio.sleep(self.round_interval_s)

    async def run_round(self, now: float | None = None) -> dict[str, Any]:
        """Do what is due: the daily backup, pruning, log archives, spooled recordings."""
        assert self.store is not None
        store, settings = self.store, self.settings
        now = time.time() if now is None else now
        done: dict[str, Any] = {}
        db = self.runtime.db
        if (
            settings.backup.daily
            and db is not None
            and (self.last_backup_at is None or now - self.last_backup_at >= DAY_S)
        ):
            try:
                self.last_backup = await off_loop(create_backup, db, store)
            except (BackupError, StorageError) as exc:
                self._report(f"daily backup failed: {exc}")
            else:
                self.last_backup_at = self.last_backup.created_at
                done["backup"] = self.last_backup.id
        done["backups_pruned"] = await off_loop(prune_backups, store, settings.backup.retention_days, now=now)
        done["logs_archived"] = await off_loop(archive_logs, store, resolve_paths().logs, node_id=self.runtime.node_id)
        done["logs_pruned"] = await off_loop(prune_log_archives, store, settings.backup.retention_days, now=now)
        done["recordings_pruned"] = await off_loop(prune_recordings, store, settings.recording.retention_days, now=now)
        if self.recordings is not None:
            done["recordings_uploaded"] = await self.recordings.upload_spooled()
        self.rounds += 1
        return done

    async def _consent(self, user_id: str) -> bool:
        from engine.store.users import get_user

        db = self.runtime.db
        if db is None or not user_id:
            return False
        user = await db.aread(lambda d: get_user(d, user_id))
        return bool(user is not None and user.recording_consent)

    def _report(self, message: str) -> None:
        self.last_error = message
        log.error("%s", message)
        self.runtime.bus.publish(events.ErrorRaised(source="storage", message=message))

    def status(self) -> dict[str, Any]:
        """For the runtime snapshot and the TUI: where, the last backup, the last problem."""
        return {
            "store": self.store.describe() if self.store is not None else None,
            "last_backup_at": self.last_backup_at,
            "last_backup": self.last_backup.id if self.last_backup else None,
            "recording": self.recordings is not None,
            "recording_active": len(self.recordings.active) if self.recordings else 0,
            "last_error": self.last_error,
            "rounds": self.rounds,
        }
