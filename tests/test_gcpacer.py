"""The GC pacer: automatic full collections off while installed, one after a tick when due."""

from __future__ import annotations

import gc

from engine.gcpacer import NEVER, GcPacer


def test_install_stops_automatic_full_collections_and_uninstall_restores() -> None:
    before = gc.get_threshold()
    pacer = GcPacer()
    pacer.install()
    try:
        assert gc.get_threshold() == (before[0], before[1], NEVER)
    finally:
        pacer.uninstall()
    assert gc.get_threshold() == before


def test_a_full_collection_runs_after_a_tick_only_when_due() -> None:
    now = [100.0]
    pacer = GcPacer(every_s=10.0, clock=lambda: now[0])
    full = []

    def watch(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(info)

    gc.callbacks.append(watch)
    try:
        pacer.after_tick()
        assert pacer.collections == 0 and not full
        now[0] += 10.0
        pacer.after_tick()
        assert pacer.collections == 1 and len(full) == 1 and pacer.last_pause_ms is not None
        now[0] += 5.0
        pacer.after_tick()
        assert pacer.collections == 1
    finally:
        gc.callbacks.remove(watch)
