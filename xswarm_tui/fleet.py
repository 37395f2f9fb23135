"""The console over a whole fleet: ``xswarm attach URL [URL …]`` and ``xswarm attach --fleet``.

``FleetLink`` is a ``Link`` (see ``xswarm_tui.link``) over one supervisor connection per node,
all on one private event loop thread. The app sees ONE runtime: every node's events in one
stream, one merged snapshot, and commands that go to the node the call is on. On top, the
link knows the fleet itself (``nodes()``: state, slots, step time, last word, GPU line per
node) for the nodes panel.

Why the link merges snapshots: the console drops calls a fresh snapshot does not list, so a
reconnecting node's snapshot alone would wipe every other node's calls. The link therefore
keeps each node's live calls (from its snapshots and call events) and hands the app the union.

A node whose supervisor connection drops is down at once: ``NodeStateChanged("down")`` and a
``CallEnded`` for each call that was last on it (a call already re-routed to another node
stays). When it comes back, its snapshot brings its calls back.

With ``--fleet`` the link also reads the shared ``nodes`` table every ``POLL_S``: the nodes
list itself (a node started later joins the console), drain state and heartbeat age as the
database has them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from engine import events as ev
from xswarm_tui.link import AudioFactory, EventSink, Link, LinkError, SnapshotSink, UserRow, _default_audio

POLL_S = 2.0
"""How often ``--fleet`` reads the nodes table (the nodes themselves heartbeat every 5 s)."""
WATCH_S = 0.1
"""How often each connection is checked; a dead node shows as down within this."""
NodeState = Literal["ready", "draining", "down"]
STEP_WINDOWS = 30
"""Recent tick windows (``TickSampled``) the step-time figure of a socket-only node covers."""


@dataclass
class NodeStatus:
    """One node as the nodes panel shows it."""

    name: str
    """The node id once its snapshot named it; its URL until then."""
    url: str
    state: NodeState = "down"
    connected: bool = False
    live: int = 0
    total: int = 0
    step_ms_p99: float | None = None
    version: str | None = None
    model: str | None = None
    last_seen: float | None = None
    """When the node last said anything (heartbeat age in the panel)."""
    step_windows: deque[float] = field(default_factory=lambda: deque(maxlen=STEP_WINDOWS))
    """The slowest step of each recent tick window (the step figure between database reads)."""
    gpu: str = ""
    """This node's GPU line: name, utilisation, memory (or why there is none)."""
    detail: str = ""

    @property
    def free(self) -> int:
        return max(0, self.total - self.live)


@dataclass
class _Node:
    url: str
    status: NodeStatus
    client: Any = None
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Live calls on this node, as snapshot entries (fields the console reads)."""
    listed_down: bool = False
    """The nodes table says it is down: connect in the background, never wait for it."""


def gpu_line(sample: ev.SystemSampled) -> str:
    """``H200 34% 41.2/139.8 GiB`` (every GPU, joined), or the reason there is none."""
    if not sample.gpus:
        return f"no GPU ({sample.gpu_reason})" if sample.gpu_reason else "no GPU"
    parts = []
    for gpu in sample.gpus:
        used, total = (gpu.get("mem_used") or 0) / 2**30, (gpu.get("mem_total") or 0) / 2**30
        util = gpu.get("util_percent")
        parts.append(f"{gpu.get('name', 'GPU')} {util if util is not None else '?'}% {used:.1f}/{total:.1f} GiB")
    return ", ".join(parts)


class FleetLink(Link):
    """Several nodes as one runtime for the console (see the module docstring)."""

    kind = "fleet"
    users_unavailable = (
        "user data is not sent over the supervisor socket; run `xswarm users list` against the shared database"
    )
    records_unavailable = (
        "records are not sent over the supervisor socket; run `xswarm calls list`, `xswarm messages list`, "
        "`xswarm audit list` against the shared database"
    )

    def __init__(
        self,
        urls: list[str],
        token: str,
        *,
        read_only: bool = False,
        audio: AudioFactory = _default_audio,
        discover: Callable[[], list[dict[str, Any]]] | None = None,
        open_timeout_s: float = 15.0,
    ) -> None:
        """``discover``: returns the nodes table (``Node.to_json()`` dicts), for ``--fleet``."""
        super().__init__(read_only=read_only, audio=audio)
        self._token = token
        self._discover = discover
        self._open_timeout_s = open_timeout_s
        self._nodes: dict[str, _Node] = {url: _Node(url, NodeStatus(url, url)) for url in dict.fromkeys(urls)}
        self._call_node: dict[str, str] = {}
        """call id -> URL of the node it is on now."""
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="xswarm-fleet", daemon=True)
        self._tasks: list[asyncio.Task[None]] = []
        self._on_event: EventSink = lambda event: None
        self._on_snapshot: SnapshotSink = lambda snapshot: None
        self._opened = False
        """Set once ``open`` has answered: from then on a node (re)connecting is news."""

    @property
    def target(self) -> str:  # type: ignore[override]
        return f"{len(self._nodes)} nodes"

    # ---------------------------------------------------------------------- for the UI

    def nodes(self) -> list[NodeStatus]:
        """A copy of every node's status, by name (any thread)."""
        with self._lock:
            return sorted((replace(n.status) for n in self._nodes.values()), key=lambda s: s.name)

    def node_of(self, call_id: str) -> str | None:
        """The name of the node ``call_id`` is on now (the board's Node column)."""
        with self._lock:
            url = self._call_node.get(call_id)
            return self._nodes[url].status.name if url in self._nodes else None

    def node_command(self, name: str, command: ev.Command) -> concurrent.futures.Future[dict[str, Any]]:
        """Send a node-wide command (drain, resume) to the node called ``name``."""
        with self._lock:
            url = next((u for u, n in self._nodes.items() if n.status.name == name), None)
        if url is None:
            raise LinkError(f"no node {name!r} in this console")
        return self._run(self._command(url, command))

    # --------------------------------------------------------------------------- Link

    def _run(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def open(self, on_event: EventSink, on_snapshot: SnapshotSink) -> dict[str, Any]:
        self._on_event, self._on_snapshot = on_event, on_snapshot
        self._thread.start()
        try:
            return self._run(self._open()).result(timeout=self._open_timeout_s + 5)
        except concurrent.futures.TimeoutError:
            raise LinkError(f"no node answered within {self._open_timeout_s:.0f} s") from None

    async def _open(self) -> dict[str, Any]:
        if self._discover is not None:
            await self._rediscover()
        if not self._nodes:
            raise LinkError("no nodes to attach to (none in the database has a supervisor URL)")
        await asyncio.gather(*(self._connect(url) for url in list(self._nodes)), return_exceptions=True)
        if not any(n.status.connected for n in self._nodes.values()):
            reasons = "; ".join(f"{n.url}: {n.status.detail}" for n in self._nodes.values())
            raise LinkError(f"no node could be reached ({reasons})")
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch()))
        if self._discover is not None:
            self._tasks.append(loop.create_task(self._poll()))
        self._opened = True
        return self._merged()

    async def _connect(self, url: str) -> None:
        from engine.supervisor.client import AuthError, SupervisorClient, SupervisorError

        node = self._nodes[url]
        client = SupervisorClient(url, self._token, name=self.actor, open_timeout=self._open_timeout_s)
        node.client = client
        try:
            await client.start(wait=False)
            if not node.listed_down:  # a node the table calls down is not waited for
                await client.wait_snapshot(self._open_timeout_s)
        except AuthError as exc:
            node.status.detail = str(exc)
            await client.close()
            node.client = None
            return
        except (SupervisorError, OSError) as exc:
            node.status.detail = str(exc)  # keeps trying in the background; shown as down meanwhile
        else:
            if client.snapshot is not None:  # in the first merged snapshot (the pump sees it again)
                self._snapshot(url, client.snapshot)
            else:
                node.status.detail = "down in the nodes table"
        if client.role is not None and client.role != "operator":
            self.can_act = False
        self._tasks.append(asyncio.get_running_loop().create_task(self._pump(url)))

    async def _pump(self, url: str) -> None:
        from engine.supervisor.client import Snapshot, SupervisorError

        node = self._nodes[url]
        try:
            async for message in node.client.messages():
                node.status.last_seen = time.time()
                if isinstance(message, Snapshot):
                    self._snapshot(url, message.data)
                else:
                    self._event(url, message)
        except SupervisorError as exc:  # the token was revoked on this node
            self._on_event(ev.ErrorRaised(source=f"node {node.status.name}", message=str(exc)))

    def _snapshot(self, url: str, data: dict[str, Any]) -> None:
        node = self._nodes[url]
        info = data.get("node") or {}
        slots = data.get("slots") or {}
        model = data.get("model") or {}
        with self._lock:
            status = node.status
            status.name = str(info.get("id") or status.name)
            status.state = "draining" if info.get("state") == "draining" else "ready"
            status.version = info.get("version")
            status.model = model.get("name") or model.get("spec")
            status.total = int(slots.get("total") or 0)
            step = ((data.get("scheduler") or {}).get("model_step_ms") or {}).get("p99")
            status.step_ms_p99 = step if step is not None else status.step_ms_p99
            node.calls = {str(c["call_id"]): c for c in data.get("calls") or [] if isinstance(c, dict)}
            status.live = len(node.calls)
            for call_id in node.calls:
                self._call_node[call_id] = url
            was_connected, status.connected = status.connected, True
        if isinstance(data.get("system"), dict):
            try:
                sample = ev.from_wire(data["system"])
            except ev.WireError:
                sample = None
            if isinstance(sample, ev.SystemSampled):
                status.gpu = gpu_line(sample)
        if self._opened and not was_connected:  # a node came back after open: say so, show its calls
            self._on_event(ev.NodeStateChanged(node_id=status.name, state=status.state, detail="reconnected"))
            self._on_snapshot(self._merged())

    def _event(self, url: str, event: ev.Event) -> None:
        node = self._nodes[url]
        status = node.status
        if isinstance(event, ev.SystemSampled):
            status.gpu = gpu_line(event)
            return
        if isinstance(event, ev.TickSampled):
            if event.active:  # an idle node's windows say nothing about its step time
                status.step_windows.append(event.step_ms_max)
                windows = list(status.step_windows)
                status.step_ms_p99 = statistics.quantiles(windows, n=100)[98] if len(windows) > 1 else windows[0]
            return
        with self._lock:
            if isinstance(event, ev.CallStarted):
                node.calls[event.call_id] = {
                    "call_id": event.call_id,
                    "slot": event.slot,
                    "source": event.source,
                    "caller": event.caller,
                    "user_id": event.user_id,
                    "theme": event.theme,
                    "started_at": event.at,
                }
                self._call_node[event.call_id] = url
            elif isinstance(event, ev.CallEnded):
                node.calls.pop(event.call_id, None)
                if self._call_node.get(event.call_id) != url:
                    return  # the call lives on elsewhere now (re-routed): this node's end is old news
                self._call_node.pop(event.call_id, None)
            elif isinstance(event, ev.NodeStateChanged):
                status.state = event.state
            status.live = len(node.calls)
        self._on_event(event)

    async def _watch(self) -> None:
        """A node whose connection dropped is down now, and so are the calls last seen on it."""
        while True:
            await asyncio.sleep(WATCH_S)
            for url, node in list(self._nodes.items()):
                client = node.client
                connected = client is not None and client.connected.is_set()
                if connected or not node.status.connected:
                    continue
                with self._lock:
                    node.status.connected = False
                    node.status.state = "down"
                    orphans = {cid: node.calls.get(cid, {}) for cid, u in self._call_node.items() if u == url}
                    for call_id in orphans:
                        del self._call_node[call_id]
                    node.calls.clear()
                    node.status.live = 0
                self._on_event(
                    ev.NodeStateChanged(node_id=node.status.name, state="down", detail="supervisor connection lost")
                )
                now = time.time()
                for call_id, call in orphans.items():
                    lasted = max(0.0, now - float(call.get("started_at") or now))
                    reason = f"node {node.status.name} down"
                    self._on_event(ev.CallEnded(call_id=call_id, reason=reason, duration_s=round(lasted, 3)))

    async def _rediscover(self) -> None:
        """``--fleet``: nodes from the shared database; new ones are connected."""
        assert self._discover is not None
        try:
            rows = await asyncio.to_thread(self._discover)
        except Exception as exc:
            self._on_event(ev.ErrorRaised(source="fleet", message=f"cannot read the nodes table: {exc}"))
            return
        fresh = []
        for row in rows:
            url = row.get("supervisor_url")
            if not url:
                continue
            with self._lock:
                node = self._nodes.get(url)
                if node is None:
                    node = self._nodes[url] = _Node(url, NodeStatus(str(row["node_id"]), url))
                    fresh.append(url)
                node.listed_down = row.get("state") == "down"
                status = node.status
                status.step_ms_p99 = row.get("step_ms_p99")
                status.version = row.get("version") or status.version
                seen = time.time() - float(row.get("last_seen_s") or 0)
                status.last_seen = max(status.last_seen or 0.0, seen)
                if status.connected and row.get("state") in ("ready", "draining"):
                    status.state = "draining" if row["state"] == "draining" else "ready"
        if fresh and self._tasks:
            await asyncio.gather(*(self._connect(url) for url in fresh), return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self._rediscover()

    def _merged(self) -> dict[str, Any]:
        """One snapshot for the console: every connected node's calls; model and slots summed."""
        with self._lock:
            calls = [c for n in self._nodes.values() if n.status.connected for c in n.calls.values()]
            total = sum(n.status.total for n in self._nodes.values() if n.status.connected)
        return {
            "node": {"id": self.target},
            "slots": {"total": total, "used": len(calls), "free": total - len(calls)},
            "calls": calls,
            "server_time": time.time(),
        }

    # ------------------------------------------------------------------------ commands

    async def _command(self, url: str, command: ev.Command) -> dict[str, Any]:
        from engine.supervisor.client import CommandError, SupervisorError

        node = self._nodes[url]
        if node.client is None or not node.status.connected:
            return {"ok": False, "error": f"node {node.status.name} is down"}
        if isinstance(command, ev.Listen) and not any(t.get_name() == f"audio {url}" for t in self._tasks):
            self._tasks.append(asyncio.get_running_loop().create_task(self._play(url), name=f"audio {url}"))
        try:
            return await node.client.command(command)
        except CommandError as exc:
            return {"ok": False, "error": str(exc), "code": exc.code}
        except SupervisorError as exc:
            return {"ok": False, "error": f"node {node.status.name}: {exc}"}

    async def _send(self, command: ev.Command) -> dict[str, Any]:
        call_id = getattr(command, "call_id", None)
        if call_id is None:
            return {"ok": False, "error": "choose a node for this: the fleet console acts on calls and nodes"}
        with self._lock:
            url = self._call_node.get(call_id)
        if url is None:
            return {"ok": False, "error": f"no live call {call_id} on any node"}
        return await asyncio.wrap_future(self._run(self._command(url, command)))

    async def _play(self, url: str) -> None:
        audio = self.local_audio()
        async for frame in self._nodes[url].client.audio():
            if frame.call_id in self._listening:
                audio.play(frame.direction, frame.pcm)

    def _microphone_sink(self, call_id: str) -> Callable[[Any], None]:
        with self._lock:
            node = self._nodes.get(self._call_node.get(call_id, ""))
        if node is None or node.client is None:
            return lambda pcm: None
        client = node.client

        def sink(pcm: Any) -> None:
            self._run(client.send_audio(call_id, pcm))

        return sink

    def users(self) -> list[UserRow] | None:
        return None

    def close(self) -> None:
        self._close_audio()
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(
                *(n.client.close() for n in self._nodes.values() if n.client is not None), return_exceptions=True
            )
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:  # websockets' keepalives of connections that died with their node
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self._run(shutdown()).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
