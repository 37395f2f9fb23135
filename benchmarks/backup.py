"""Backup and restore of a database holding 1,000,000 events: local folder and S3 (moto).

Prints one JSON object: for each store, backup time, stored (compressed) size, restore time,
and the row counts checked after restore. S3 runs against the real moto server on 127.0.0.1
(in memory, so it measures our pipeline and the HTTP path, not a WAN).

    .venv/bin/python benchmarks/backup.py [--events 1000000] [--no-s3] [--no-dump]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(events: int) -> tuple[float, int]:
    """A migrated database with ``events`` rows in ``events`` (plus a few users and calls)."""
    from engine.config import load_settings
    from engine.store.migrations import open_database

    started = time.perf_counter()
    db = open_database(load_settings())
    path = Path(db.target.location)
    db.close()
    conn = db.target.connect()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO users (id, name, phone, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        [(f"u{i}", f"User {i}", f"+1555{i:07d}", i, i) for i in range(1000)],
    )
    batch = 50_000
    t0 = 1_790_000_000_000
    for start in range(0, events, batch):
        conn.executemany(
            "INSERT INTO events (at, type, call_id, user_id, summary, payload) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    t0 + i * 80,
                    ("CallStarted", "CallEnded", "TranscriptAppended", "LatencySampled")[i % 4],
                    f"CA{i // 50:032x}",
                    f"u{i % 1000}",
                    f"call {i // 50} event {i % 50}",
                    json.dumps({"step_ms": round(20 + (i % 37) * 0.5, 2), "slot": i % 16, "n": i}),
                )
                for i in range(start, min(start + batch, events))
            ],
        )
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started, path.stat().st_size


def measure(store, db, workdir: Path, method: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    from engine.storage.backup import create_backup, restore_backup

    started = time.perf_counter()
    backup = create_backup(db, store, method=method)  # type: ignore[arg-type]
    backup_s = time.perf_counter() - started
    dest = workdir / f"restored-{method}-{backup.id}.db"
    restored = restore_backup(store, backup.id, dest)
    assert restored.row_counts == backup.row_counts
    out = {
        "method": method,
        "format": backup.format,
        "compression": backup.compression,
        "backup_s": round(backup_s, 3),
        "stored_bytes": backup.size,
        "restore_s": round(restored.seconds, 3),
        "restored_db_bytes": dest.stat().st_size,
        "events_restored": restored.row_counts["events"],
    }
    dest.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--no-dump", action="store_true", help="skip the logical-dump figures")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="xswarm-bench-backup-") as tmp:
        work = Path(tmp)
        os.environ["XSWARM_HOME"] = str(work / "home")
        for name in [n for n in os.environ if n.startswith("XSWARM_S3_")]:
            del os.environ[name]
        from engine.config import load_settings
        from engine.storage import LocalStore
        from engine.store.db import Database

        generate_s, db_bytes = build(args.events)
        db = Database.from_settings(load_settings())
        result: dict[str, object] = {
            "benchmark": "backup",
            "events": args.events,
            "db_bytes": db_bytes,
            "generate_s": round(generate_s, 2),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        local = LocalStore(work / "objects")
        result["local"] = measure(local, db, work, "snapshot")
        if not args.no_dump:
            result["local_dump"] = measure(local, db, work, "dump")
        if not args.no_s3:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

            sys.path.insert(0, str(ROOT / "tests"))
            from fixtures.s3 import create_bucket

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            try:
                host, port = server.get_host_and_port()
                target = create_bucket(f"http://{host}:{port}")
                result["s3"] = measure(target.store(), db, work, "snapshot")
            finally:
                server.stop()
        db.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
