"""The console's one connection to a runtime: events in, commands out.

Why one interface: `xswarm` (the runtime embedded in this process) and `xswarm attach ws://…`
(a runtime elsewhere, over the supervisor socket) share ONE UI code path.
The app only ever talks to a ``Link``:

* ``open(on_event, on_snapshot)``: connect, deliver runtime events to ``on_event`` (called
  from another thread; it must not block) and return the runtime's snapshot; later snapshots
  (after a reconnect) go to ``on_snapshot``. Blocking: the app calls it in a thread worker
  after its first paint, so the screen never waits for the runtime or torch.
* ``execute(command)``: run one supervisor command (``engine.events`` Command types), with
  the audio it implies (listen plays the call on this machine; takeover opens the microphone),
  and return the answer; a refusal raises ``LinkError`` with a sentence for the operator. An
  ``"audio"`` entry in the answer says why sound is missing while the command itself worked.
* ``users()``: tier and usage rows, or ``None`` with ``users_unavailable`` saying why.
* ``database()``: the node's database for the records screens (history, inbox, audit), or
  ``None`` with ``records_unavailable`` saying why.
* ``health()``: ``None`` while events flow, else a sentence ("disconnected …, retrying in
  3 s") that the header shows at once, so a dead node never looks like a quiet one.

``EmbeddedLink`` drives an in-process ``engine.runtime.Runtime`` through
``engine.control.CallControl``; ``AttachedLink`` drives ``engine.supervisor.client``.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import getpass
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from engine import events as ev

log = logging.getLogger("xswarm.tui.link")

EventSink = Callable[[ev.Event], None]
SnapshotSink = Callable[[dict[str, Any]], None]
AudioFactory = Callable[[], Any]
"""Returns a ``LocalAudio``-like object (play/start_speakers/stop_speakers/start_microphone/
stop_microphone/close) or a string saying why there is no sound."""


class LinkError(Exception):
    """A command or connection failed; the message is shown to the operator as is."""

    def __init__(self, message: str, *, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
        """True when trying again later may work (the node is down or unreachable), False when
        only the operator can fix it (a refused token)."""


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


def _default_audio() -> Any:
    from xswarm_tui.audio import open_audio

    return open_audio()


class Link(abc.ABC):
    """A runtime as the console sees it (see the module docstring)."""

    kind: str
    """"embedded" or "attached"."""
    target: str
    """Where the runtime is, for the header."""
    users_unavailable: str | None = None
    """Why ``users()`` returns None, when it does."""
    records_unavailable: str | None = None
    """Why ``database()`` returns None, when it does."""

    def __init__(self, *, read_only: bool, audio: AudioFactory = _default_audio) -> None:
        self.can_act = not read_only
        """False when read-only (``--read-only`` or a monitor token); may turn False on open."""
        self.actor = operator_name()
        self._audio_factory = audio
        self._audio: Any = None
        self._listening: set[str] = set()

    @property
    def role(self) -> str:
        return "operator" if self.can_act else "monitor"

    @abc.abstractmethod
    def open(self, on_event: EventSink, on_snapshot: SnapshotSink) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def _send(self, command: ev.Command) -> dict[str, Any]:
        """Deliver one command to the runtime; returns its answer dict (``ok`` True/False)."""

    @abc.abstractmethod
    def _microphone_sink(self, call_id: str) -> Callable[[Any], None]:
        """Where 80 ms microphone frames go while this console holds ``call_id``."""

    @abc.abstractmethod
    def users(self) -> list[UserRow] | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def database(self) -> Any:
        """The node's ``Database`` for reading records, or None (``records_unavailable`` says why)."""
        return None

    def health(self) -> str | None:
        """None while connected; otherwise what is wrong and when the next attempt is."""
        return None

    def object_store(self) -> Any:
        """Where recordings are uploaded (``ObjectStore``), or None when this link cannot reach it."""
        return None

    def local_audio(self) -> Any:
        """The sound device (opened once), or the reason there is none."""
        if self._audio is None:
            self._audio = self._audio_factory()
        return self._audio

    async def execute(self, command: ev.Command) -> dict[str, Any]:
        audio = self.local_audio()
        note: str | None = None
        if isinstance(command, ev.Listen):
            if isinstance(audio, str):  # listening without speakers would only waste the call's bandwidth
                raise LinkError(f"cannot listen: {audio}")
            audio.start_speakers()
        answer = await self._send(command)
        if not answer.get("ok", True):
            if isinstance(command, ev.Listen) and not self._listening and not isinstance(audio, str):
                audio.stop_speakers()
            raise LinkError(str(answer.get("error") or "refused"))
        call_id = getattr(command, "call_id", None)
        if isinstance(command, ev.Listen):
            self._listening.add(command.call_id)
        elif isinstance(command, ev.Unlisten):
            self._listening.discard(command.call_id)
            if not self._listening and not isinstance(audio, str):
                audio.stop_speakers()
        elif isinstance(command, ev.TakeOver) and call_id:
            if isinstance(audio, str):
                note = f"{audio}; the caller hears silence until you hand back"
            else:
                audio.start_microphone(self._microphone_sink(call_id))
        elif isinstance(command, ev.HandBack) and not isinstance(audio, str):
            audio.stop_microphone()
        return {**answer, "audio": note} if note else answer

    def _close_audio(self) -> None:
        if self._audio is not None and not isinstance(self._audio, str):
            self._audio.close()


USERS_SQL = """
SELECT u.id, u.name, u.tier, u.phone,
       COALESCE(g.voice_seconds, 0), COALESCE(g.sms_count, 0), COALESCE(g.email_count, 0)
FROM users u LEFT JOIN usage g ON g.user_id = u.id AND g.period = ?
ORDER BY u.created_at DESC LIMIT 1000
"""


class EmbeddedLink(Link):
    """The runtime in this process: its bus, its ``CallControl``, its database, this machine's audio."""

    kind = "embedded"
    target = "this process"

    def __init__(
        self, build_runtime: Callable[[], Any], *, read_only: bool = False, audio: AudioFactory = _default_audio
    ) -> None:
        super().__init__(read_only=read_only, audio=audio)
        self._build = build_runtime
        """Makes (not starts) the Runtime; called in the worker so imports stay off the first paint."""
        self.runtime: Any = None
        self._control: Any = None
        self._unsubscribe: Callable[[], None] | None = None

    def open(self, on_event: EventSink, on_snapshot: SnapshotSink) -> dict[str, Any]:
        from engine.control import CallControl

        self.runtime = self._build()
        self._unsubscribe = self.runtime.bus.subscribe(on_event)
        try:
            self.runtime.start()
        except BaseException:  # a busy port, a bad setting: undo what started, so Retry starts clean
            self._unsubscribe()
            self._unsubscribe = None
            try:
                self.runtime.stop()
            except Exception:
                log.exception("stopping the runtime that failed to start")
            self.runtime = None
            raise
        self._control = CallControl(self.runtime)
        return self.runtime.snapshot()

    def _on_loop(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return self.runtime.call_soon(coro)

    async def _send(self, command: ev.Command) -> dict[str, Any]:
        if self._control is None:
            raise LinkError("the runtime is still starting")
        tap = None
        if isinstance(command, ev.Listen):
            tap = self.local_audio().play
        return await asyncio.wrap_future(self._on_loop(self._control.execute(command, self.actor, self.role, tap=tap)))

    def _microphone_sink(self, call_id: str) -> Callable[[Any], None]:
        session = self.runtime.calls.get(call_id)
        loop = self.runtime.loop
        if session is None:
            return lambda pcm: None
        return lambda pcm: loop.call_soon_threadsafe(session.feed_operator_audio, pcm)

    def database(self) -> Any:
        db = getattr(self.runtime, "db", None)
        if db is None:
            self.records_unavailable = "no database is open in this runtime"
        return db

    def object_store(self) -> Any:
        if self.runtime is None:
            return None
        from engine.storage import open_store

        return open_store(self.runtime.settings)

    def users(self) -> list[UserRow] | None:
        db = getattr(self.runtime, "db", None)
        if db is None:
            self.users_unavailable = "no database is open in this runtime"
            return None
        rows = db.query(USERS_SQL, (time.strftime("%Y-%m", time.gmtime()),))
        return [UserRow(str(r[0]), str(r[1]), str(r[2]), r[3], float(r[4]) / 60.0, int(r[5]), int(r[6])) for r in rows]

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._control is not None:  # hand back anything this console still holds
            try:
                self._on_loop(self._control.release(self.actor, self.role, "console closed")).result(timeout=5)
            except Exception:
                log.exception("releasing this console's calls failed")
        self._close_audio()
        if self.runtime is not None:
            self.runtime.stop()


class AttachedLink(Link):
    """A runtime elsewhere, through ``SupervisorClient`` on a private event loop thread.

    Why its own loop: the client parses every event and audio frame; on Textual's loop that
    work would compete with drawing, and on its own thread it behaves like the embedded bus.
    """

    kind = "attached"
    users_unavailable = (
        "user data is not sent over the supervisor socket; "
        "run `xswarm` on the server (or query its database) to see users"
    )
    records_unavailable = (
        "records are not sent over the supervisor socket; on the node run "
        "`xswarm calls list`, `xswarm messages list`, `xswarm audit list`"
    )

    def __init__(
        self,
        url: str,
        token: str,
        *,
        read_only: bool = False,
        audio: AudioFactory = _default_audio,
        open_timeout_s: float = 15.0,
    ) -> None:
        super().__init__(read_only=read_only, audio=audio)
        self.target = url
        self._token = token
        self._open_timeout_s = open_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="xswarm-attach", daemon=True)
        self._client: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    def _run(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def open(self, on_event: EventSink, on_snapshot: SnapshotSink) -> dict[str, Any]:
        """Connect once; a failure raises ``LinkError`` (``retry`` unless the token was refused),
        and the app calls ``open`` again after a backoff."""
        if not self._thread.is_alive():
            self._thread.start()
        attempt = self._run(self._connect(on_event, on_snapshot))
        try:
            return attempt.result(timeout=self._open_timeout_s)
        except concurrent.futures.TimeoutError:
            attempt.cancel()  # the next attempt starts clean; this one closes its client
            raise LinkError(f"no answer from {self.target} within {self._open_timeout_s:.0f} s", retry=True) from None

    def health(self) -> str | None:
        client = self._client
        if client is None or client.connected.is_set():
            return None
        why = f" ({client.last_connect_error})" if client.last_connect_error else ""
        if client.retry_at is None:
            return f"disconnected{why}, reconnecting…"
        return f"disconnected{why}, retrying in {max(0, client.retry_at - time.monotonic()):.0f} s"

    async def _connect(self, on_event: EventSink, on_snapshot: SnapshotSink) -> dict[str, Any]:
        from engine.supervisor.client import AuthError, SupervisorClient, SupervisorError

        client = SupervisorClient(self.target, self._token, name=self.actor, open_timeout=self._open_timeout_s / 3)
        self._client = client  # health() reports the first attempts too
        try:
            await client.start()
        except asyncio.CancelledError:
            await client.close()
            self._client = None
            raise
        except AuthError as exc:
            await client.close()
            self._client = None  # nothing to report on: this link is not trying any more
            raise LinkError(f"{self.target}: {exc}") from None
        except SupervisorError as exc:
            await client.close()
            self._client = None
            raise LinkError(f"{self.target}: {exc}", retry=True) from None
        except OSError as exc:
            await client.close()
            self._client = None
            raise LinkError(f"cannot reach {self.target}: {exc}", retry=True) from None
        if self._client.role != "operator":
            self.can_act = False
        self.actor = self._client.actor or self.actor  # the server's name for this console (audit, takeover)
        self._tasks.append(asyncio.get_running_loop().create_task(self._pump(on_event, on_snapshot)))
        return dict(self._client.snapshot or {})

    async def _pump(self, on_event: EventSink, on_snapshot: SnapshotSink) -> None:
        from engine.supervisor.client import Snapshot, SupervisorError

        try:
            async for message in self._client.messages():
                if isinstance(message, Snapshot):
                    on_snapshot(message.data)
                else:
                    on_event(message)
        except SupervisorError as exc:  # the token was revoked: say so on the feed, stop reading
            on_event(ev.ErrorRaised(source="supervisor", message=str(exc)))

    async def _play(self) -> None:
        audio = self.local_audio()
        async for frame in self._client.audio():
            if frame.call_id in self._listening:
                audio.play(frame.direction, frame.pcm)

    async def _send(self, command: ev.Command) -> dict[str, Any]:
        from engine.supervisor.client import CommandError, SupervisorError

        async def send() -> dict[str, Any]:
            if isinstance(command, ev.Listen) and not any(t.get_name() == "audio" for t in self._tasks):
                self._tasks.append(asyncio.get_running_loop().create_task(self._play(), name="audio"))
            try:
                return await self._client.command(command)
            except CommandError as exc:
                return {"ok": False, "error": str(exc), "code": exc.code}
            except SupervisorError as exc:
                return {"ok": False, "error": f"{self.target}: {exc}"}

        return await asyncio.wrap_future(self._run(send()))

    def _microphone_sink(self, call_id: str) -> Callable[[Any], None]:
        def sink(pcm: Any) -> None:
            self._run(self._client.send_audio(call_id, pcm))

        return sink

    def users(self) -> list[UserRow] | None:
        return None

    def close(self) -> None:
        self._close_audio()
        if self._thread.is_alive():

            async def shutdown() -> None:
                for task in self._tasks:
                    task.cancel()
                if self._client is not None:
                    await self._client.close()

            try:
                self._run(shutdown()).result(timeout=5)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=5)
