"""The console's one connection to a runtime: events in, commands out.

Why one interface: the issue asks for ONE UI code path for `xswarm` (the runtime embedded in
this process) and `xswarm attach ws://…` (a runtime elsewhere, over the supervisor socket).
The app only ever talks to a ``Link``:

* ``open(on_event)``: connect, start delivering runtime events to ``on_event`` (from any
  thread; it must not block), and return the runtime's snapshot. Blocking: the app calls it in
  a thread worker, after its first paint, so the screen never waits for the runtime or torch.
* ``execute(command)``: run one supervisor command (``engine.events`` Command types) and
  return the runtime's answer, or raise ``LinkError`` with a sentence for the operator.
* ``users()``: tier and usage rows, or ``None`` with ``users_unavailable`` saying why.
* listen/talk audio: the runtime's call audio to this machine's speakers and the microphone
  into a call; each returns ``None`` when it works, else the reason it cannot.

``EmbeddedLink`` drives an in-process ``engine.runtime.Runtime`` through
``engine.control.CallControl``; ``AttachedLink`` drives ``engine.supervisor.client``.
"""

from __future__ import annotations

import abc
import asyncio
import getpass
import inspect
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine import events as ev

log = logging.getLogger("xswarm.tui.link")

EventSink = Callable[[ev.Event], None]


class LinkError(Exception):
    """A command or connection failed; the message is shown to the operator as is."""


@dataclass(frozen=True)
class UserRow:
    """One user with this month's usage."""

    user_id: str
    name: str
    tier: str
    phone: str | None
    voice_minutes: float
    sms: int
    email: int


def operator_name() -> str:
    """Who acts, for the audit log: ``user@host`` of the terminal running the console."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    return f"{user}@{socket.gethostname()}"


class Link(abc.ABC):
    """A runtime as the console sees it (see the module docstring)."""

    kind: str
    """"embedded" or "attached"."""
    target: str
    """Where the runtime is, for the header: "this process" or the socket URL."""
    can_act: bool
    """False when read-only (the `--read-only` flag or a monitor token)."""
    users_unavailable: str | None = None
    """Why ``users()`` returns None, when it does."""

    @abc.abstractmethod
    def open(self, on_event: EventSink) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def execute(self, command: ev.Command) -> dict[str, Any]: ...

    @abc.abstractmethod
    def users(self) -> list[UserRow] | None: ...

    @abc.abstractmethod
    async def listen(self, call_id: str, on: bool) -> str | None: ...

    @abc.abstractmethod
    async def talk(self, call_id: str, on: bool) -> str | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


USERS_SQL = """
SELECT u.id, u.name, u.tier, u.phone,
       COALESCE(g.voice_seconds, 0), COALESCE(g.sms_count, 0), COALESCE(g.email_count, 0)
FROM users u LEFT JOIN usage g ON g.user_id = u.id AND g.period = ?
ORDER BY u.created_at DESC LIMIT 1000
"""


def rows_to_users(rows: list[tuple[Any, ...]]) -> list[UserRow]:
    return [UserRow(str(r[0]), str(r[1]), str(r[2]), r[3], float(r[4]) / 60.0, int(r[5]), int(r[6]))
            for r in rows]


class EmbeddedLink(Link):
    """The runtime in this process: its bus, its ``CallControl``, its database, this machine's audio."""

    kind = "embedded"
    target = "this process"

    def __init__(self, build_runtime: Callable[[], Any], *, read_only: bool = False) -> None:
        self._build = build_runtime
        """Makes (not starts) the Runtime; called in the worker so imports stay off the first paint."""
        self.runtime: Any = None
        self.can_act = not read_only
        self._role = "operator" if self.can_act else "monitor"
        self._actor = operator_name()
        self._control: Any = None
        self._unsubscribe: Callable[[], None] | None = None
        self._audio: Any = None
        self._taps: dict[str, Callable[[], None]] = {}

    def open(self, on_event: EventSink) -> dict[str, Any]:
        from engine.control import CallControl

        self.runtime = self._build()
        self._unsubscribe = self.runtime.bus.subscribe(on_event)
        self.runtime.start()
        self._control = CallControl(self.runtime)
        return self.runtime.snapshot()

    async def _on_runtime(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (sync or async) on the runtime's loop, where call sessions live."""

        async def run() -> Any:
            result = fn()
            return await result if inspect.isawaitable(result) else result

        try:
            return await asyncio.wrap_future(self.runtime.call_soon(run()))
        except LinkError:
            raise
        except Exception as exc:  # CallControlError, PermissionError, …: the message is for the operator
            raise LinkError(str(exc) or type(exc).__name__) from None

    async def execute(self, command: ev.Command) -> dict[str, Any]:
        if self._control is None:
            raise LinkError("the runtime is still starting")
        answer = await self._on_runtime(lambda: self._control.execute(command, self._actor, self._role))
        return answer if isinstance(answer, dict) else {"result": answer}

    def users(self) -> list[UserRow] | None:
        db = getattr(self.runtime, "db", None)
        if db is None:
            self.users_unavailable = "no database is open in this runtime"
            return None
        return rows_to_users(db.query(USERS_SQL, (time.strftime("%Y-%m", time.gmtime()),)))

    def _local_audio(self) -> Any:
        from xswarm_tui.audio import open_audio

        if self._audio is None:
            self._audio = open_audio()
        return self._audio

    async def listen(self, call_id: str, on: bool) -> str | None:
        audio = self._local_audio()
        if isinstance(audio, str):
            return audio
        if not on:
            remove = self._taps.pop(call_id, None)
            if remove is not None:
                await self._on_runtime(remove)
            if not self._taps:
                audio.stop_speakers()
            return None
        session = self.runtime.calls.get(call_id)
        if session is None:
            return f"call {call_id} has ended"
        audio.start_speakers()
        self._taps[call_id] = await self._on_runtime(lambda: session.add_tap(audio.play))
        return None

    async def talk(self, call_id: str, on: bool) -> str | None:
        audio = self._local_audio()
        if isinstance(audio, str):
            return audio
        if not on:
            audio.stop_microphone()
            return None
        session = self.runtime.calls.get(call_id)
        if session is None:
            return f"call {call_id} has ended"
        loop = self.runtime.loop
        audio.start_microphone(lambda pcm: loop.call_soon_threadsafe(session.feed_operator_audio, pcm))
        return None

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._audio is not None and not isinstance(self._audio, str):
            self._audio.close()
        if self.runtime is not None:
            self.runtime.stop()
