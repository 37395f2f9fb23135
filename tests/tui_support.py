"""Shared pieces of the TUI tests: a real call through the bridge simulator, recording audio,
and a deterministic replay source for snapshots."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from engine import events as ev
from engine.audio import mulaw
from engine.bridge import simulator
from engine.calls import CallSession
from engine.telephony.calltoken import mint
from xswarm_tui.link import Link, UserRow

FIXED_NOW = 1_795_000_000.0
"""The fake clock of snapshot tests (a Thursday in November 2026, 08:26:40 UTC)."""


class RecordingAudio:
    """Stands in for the sound device: keeps what a listen tap plays and runs the microphone."""

    def __init__(self) -> None:
        self.played: list[tuple[str, int]] = []
        self.speakers = False
        self.mic_sink: Callable[[np.ndarray], None] | None = None
        self.clips: list[tuple[int, int]] = []
        """(samples, rate) of each stored recording played."""

    def play(self, direction: str, frame: np.ndarray) -> None:
        self.played.append((direction, len(frame)))

    def start_speakers(self) -> None:
        self.speakers = True

    def stop_speakers(self) -> None:
        self.speakers = False

    def start_microphone(self, sink: Callable[[np.ndarray], None]) -> None:
        self.mic_sink = sink

    def stop_microphone(self) -> None:
        self.mic_sink = None

    def play_clip(self, samples: np.ndarray, rate: int) -> None:
        self.clips.append((len(samples), rate))

    def stop_clip(self) -> None:
        self.clips.clear()

    def close(self) -> None:
        self.stop_microphone()
        self.stop_speakers()


AUTH_TOKEN = "twilio-auth-token-for-tui-tests"
TOKEN_SECRET = "call-token-secret-for-tui-tests"


def telephony_env(monkeypatch: Any) -> None:
    """What the bridge needs to admit a call: Twilio's auth token (signatures) and the call-token key."""
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("XSWARM_CALL_TOKEN_SECRET", TOKEN_SECRET)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_call(
    runtime: Any, call_sid: str = "CA" + "7" * 32, caller: str = "+15550100123", seconds: float = 120.0
) -> CallSession:
    """A phone call as Twilio places it: the ``xswarm call`` simulator streams a tone into the
    runtime's real bridge (signed upgrade, one-time token) from its own thread, in real time."""
    t = np.arange(int(8000 * seconds)) / 8000
    audio = mulaw.encode((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)).tobytes()
    target = simulator.StreamTarget(
        f"ws://127.0.0.1:{runtime.bridge_port}/twilio",
        {"token": mint(TOKEN_SECRET, call_sid), "caller": caller, "user_id": "u-ada", "theme": "kitt"},
    )
    threading.Thread(
        target=lambda: asyncio.run(simulator.stream_call(target, audio, auth_token=AUTH_TOKEN, call_sid=call_sid)),
        name="twilio-simulator",
        daemon=True,
    ).start()
    wait_until(lambda: runtime.calls.get(call_sid) is not None)
    return runtime.calls.get(call_sid)


async def until(pilot: Any, predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Let the app run until ``predicate()`` holds (AssertionError after ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


def cell(app: Any, call_id: str, column: str) -> str:
    """The text of one calls-board cell."""
    return str(app.board.get_cell(call_id, column))


def toasts(app: Any) -> str:
    """Every notification shown so far, joined."""
    return " | ".join(f"{n.title}: {n.message}" for n in app._notifications)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class ReplayLink(Link):
    """A fixed sequence of events with fixed times: what snapshot tests need to be repeatable."""

    kind = "embedded"
    target = "replay"

    def __init__(
        self, events: list[ev.Event], *, read_only: bool = False, snapshot: dict[str, Any] | None = None
    ) -> None:
        super().__init__(read_only=read_only, audio=lambda: "no audio device on this machine")
        self.events = events
        self.snapshot = snapshot or {}
        """What ``open`` returns; by default no call list: the replayed events are the whole truth."""
        self.sent: list[ev.Command] = []
        self.refuse: str | None = None
        """When set, every command is refused with this error."""

    def open(self, on_event: Callable[[ev.Event], None], on_snapshot: Callable[[dict], None]) -> dict[str, Any]:
        for event in self.events:
            on_event(event)
        return self.snapshot

    async def _send(self, command: ev.Command) -> dict[str, Any]:
        self.sent.append(command)
        return {"ok": False, "error": self.refuse} if self.refuse else {"ok": True}

    def _microphone_sink(self, call_id: str) -> Callable[[np.ndarray], None]:
        return lambda pcm: None

    def users(self) -> list[UserRow] | None:
        return [UserRow("u-ada", "Ada", "pro", "+15550100123", 12.5, 3, 1)]

    def close(self) -> None:
        pass


def busy_night(calls: int = 3) -> Iterator[ev.Event]:
    """A plausible moment: a few calls in different modes, a GPU, a feed with every kind."""
    at = FIXED_NOW - 300
    yield ev.ModelStatusChanged(model="moshi", state="ready", detail="moshiko bf16: 8 slots", at=at)
    yield ev.SystemSampled(
        cpu_percent=37.0,
        ram_used_bytes=41 * 2**30,
        ram_total_bytes=128 * 2**30,
        gpus=[
            {
                "name": "NVIDIA H100 80GB HBM3",
                "util_percent": 64.0,
                "mem_used": 52 * 2**30,
                "mem_total": 80 * 2**30,
                "temp_c": 61.0,
                "power_w": 412.0,
            }
        ],
        at=FIXED_NOW - 0.5,
    )
    for step in (31.0, 33.5, 35.0, 32.2, 34.8, 36.1, 33.3):
        yield ev.TickSampled(step_ms_p50=step, step_ms_max=step + 9, active=calls, slots=8, missed_ticks=0, at=at)
    modes = ("ai", "operator", "muted")
    for i in range(calls):
        cid = f"CA{i + 1:02d}f3e9"
        yield ev.CallStarted(
            cid,
            i,
            "twilio",
            f"+1415555{i:04d}",
            f"u-{i}",
            ("xswarm", "hal-9000", "kitt")[i % 3],
            at=FIXED_NOW - 60 * (i + 1) - 7,
        )
        if modes[i % 3] != "ai":
            yield ev.CallUpdated(
                cid, modes[i % 3], operator="ops@console" if modes[i % 3] == "operator" else None, at=at
            )
        for k in range(8):
            yield ev.LatencySampled(
                cid,
                step_ms=33.0 + k,
                bal_ms=95.0 + 40 * i + k,
                playout_lag_ms=180.0 + 90 * i,
                late_frames=2 * i,
                in_level=0.05 * (k % 3),
                out_level=0.08,
                at=at,
            )
        yield ev.TranscriptAppended(cid, "Hello, thanks for calling. How can I help?", at=at)
    yield ev.DtmfReceived("CA01f3e9", "4", at=at)
    yield ev.MessageReceived("sms", "u-0", "Can you call me back at 5?", at=FIXED_NOW - 200)
    yield ev.MessageReceived("email", "u-1", "Re: invoice for November", at=FIXED_NOW - 150)
    yield ev.PaymentStatusChanged("u-2", "paid", tier="pro", at=FIXED_NOW - 120)
    yield ev.UserCreated("u-9", "Grace Hopper", "free", at=FIXED_NOW - 90)
    yield ev.WebhookFailed("stripe", "evt_1Q2w3E", "signature mismatch", dead=True, at=FIXED_NOW - 60)
