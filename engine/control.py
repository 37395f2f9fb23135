"""Supervisor actions on live calls, one code path for every front end.

The supervisor socket, the embedded TUI and ``xswarm attach`` all end here: ``CallControl``
checks the actor's role, applies the command to the live ``CallSession`` (engine/calls.py),
writes the action to ``audit_log`` and publishes ``SupervisorActed`` so every other console
sees it. It runs on the runtime loop; the session methods it calls are cheap and take effect
at the next 80 ms tick.

Results are plain dicts (``{"ok": True, …}`` or ``{"ok": False, "error": …, "code": …}``) so the
socket can send them as they are and the TUI can show them without knowing the protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from xml.sax.saxutils import escape

from engine.calls import CallControlError, CallSession
from engine.events import (
    Command,
    DrainNode,
    HandBack,
    HangUp,
    Listen,
    Mute,
    ResumeNode,
    StartLocalCall,
    SupervisorActed,
    TakeOver,
    Transfer,
    Unlisten,
    Unmute,
    Whisper,
    wire_types,
)
from engine.host import RuntimeHost
from engine.phone import E164
from engine.telephony import twilio_rest

if TYPE_CHECKING:
    from engine.store.db import Database

log = logging.getLogger("xswarm.control")

Tap = Callable[[str, Any], None]
"""tap(direction "caller"|"ai", float32 24 kHz frame) as in ``CallSession.add_tap``."""

ACTIONS: dict[type[Command], str] = {cls: cls.action for cls in wire_types(Command)}
"""Command class -> its action name (``Command.action``), in definition order."""

MONITOR_ACTIONS = frozenset({"listen", "unlisten"})
"""What the read-only role may do: watching and listening change nothing on the call."""

TRANSFER_TIMEOUT_S = 10.0


class ControlError(Exception):
    """A command that cannot be applied; ``code`` is machine-readable for clients."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


class ControlHost(RuntimeHost, Protocol):
    """What call control uses of the runtime."""

    @property
    def db(self) -> Database | None: ...
    async def start_local_call(self) -> str: ...


class CallControl:
    """Applies supervisor commands to live calls. One instance per front end is fine:
    exclusivity of takeover lives in the ``CallSession`` itself."""

    def __init__(self, runtime: ControlHost) -> None:
        self.runtime = runtime
        self._taps: dict[tuple[str, str], Callable[[], None]] = {}
        """(actor, call_id) -> the function that removes that actor's tap."""
        self._held: dict[str, set[str]] = {}
        """actor -> call ids this actor has taken over (for hand-back when it goes away)."""

    # ------------------------------------------------------------------------------- API

    async def execute(self, command: Command, actor: str, role: str, *, tap: Tap | None = None) -> dict[str, Any]:
        """Check, apply, audit and announce one command. Never raises for a bad command:
        the answer says what went wrong."""
        action = command.action if isinstance(command, Command) else None
        call_id = getattr(command, "call_id", None)
        detail: dict[str, Any] = {}
        try:
            if action is None:
                raise ControlError("invalid", f"{type(command).__name__} is not a supervisor command")
            if role not in ("operator", "monitor"):
                raise ControlError("forbidden", f"unknown role {role!r}")
            if role != "operator" and action not in MONITOR_ACTIONS:
                raise ControlError(
                    "forbidden", f"the {role} role may only watch and listen; {action} needs an operator token"
                )
            try:
                result = await self._apply(command, actor, tap, detail)
            except CallControlError as exc:  # the session refused: someone else holds it, it ended …
                if call_id is None:  # start_local_call: no sound device here
                    raise ControlError("unavailable", str(exc)) from None
                call = self.runtime.calls.get(call_id)
                raise ControlError("conflict", str(exc), operator=call.operator if call else None) from None
        except ControlError as exc:
            answer = {"ok": False, "error": str(exc), "code": exc.code, **exc.extra}
            self._audit(actor, role, action or type(command).__name__, call_id, detail, f"error: {exc}")
            return answer
        except Exception as exc:  # a bug or a dead socket in the session must not kill the caller
            log.exception("%s on %s failed", action, call_id)
            self._audit(actor, role, action or "?", call_id, detail, f"error: {exc}")
            return {"ok": False, "error": f"{action} failed: {exc}", "code": "failed"}
        self._audit(actor, role, action, call_id, detail, "ok")
        return {"ok": True, **result}

    async def release(self, actor: str, role: str, reason: str) -> None:
        """Undo what ``actor`` holds: stop its taps and hand back its takeovers (a supervisor
        whose socket dropped must never leave a caller talking to nobody). A coroutine, like
        ``execute``, so other threads run it on the runtime loop with ``runtime.call_soon``."""
        for key in [k for k in self._taps if k[0] == actor]:
            remove = self._taps.pop(key)
            _quietly(remove)
        for call_id in sorted(self._held.pop(actor, set())):
            call = self.runtime.calls.get(call_id)
            if call is None or call.operator != actor:
                continue
            try:
                call.hand_back(actor)
                result = "ok"
            except Exception as exc:
                log.exception("automatic hand-back of %s failed", call_id)
                result = f"error: {exc}"
            self._audit(actor, role, "handback", call_id, {"reason": reason, "automatic": True}, result)

    def holds(self, actor: str, call_id: str) -> bool:
        """Whether ``actor`` took ``call_id`` over through this instance (operator audio check)."""
        return call_id in self._held.get(actor, ())

    # ---------------------------------------------------------------------------- actions

    async def _apply(self, command: Command, actor: str, tap: Tap | None, detail: dict[str, Any]) -> dict[str, Any]:
        match command:
            case StartLocalCall():
                return await self._start_local_call()
            case DrainNode() | ResumeNode():
                return await self._set_node_state("draining" if isinstance(command, DrainNode) else "ready")
            case Unlisten(call_id=call_id):
                remove = self._taps.pop((actor, call_id), None)
                if remove is None:
                    raise ControlError("not_listening", f"not listening to {call_id}")
                _quietly(remove)
                return {"call_id": call_id}
            case Listen(call_id=call_id):
                call = self._live(call_id)
                if tap is None:
                    raise ControlError("invalid", "listen needs an audio sink")
                previous = self._taps.pop((actor, call_id), None)
                if previous is not None:
                    _quietly(previous)
                self._prune_taps()
                self._taps[(actor, call_id)] = call.add_tap(tap)
            case Whisper(call_id=call_id, text=raw):
                call = self._live(call_id)
                text = raw.strip()
                if not text:
                    raise ControlError("invalid", "whisper text is empty")
                detail["text"] = text
                call.whisper(text)
            case Mute(call_id=call_id) | Unmute(call_id=call_id):
                call = self._live(call_id)
                call.mute(isinstance(command, Mute))
            case TakeOver(call_id=call_id):
                call = self._live(call_id)
                call.take_over(actor)
                self._held.setdefault(actor, set()).add(call_id)
            case HandBack(call_id=call_id):
                call = self._live(call_id)
                call.hand_back(actor)
                self._held.get(actor, set()).discard(call_id)
            case HangUp(call_id=call_id):
                call = self._live(call_id)
                await call.hang_up(f"hung up by {actor}")
            case Transfer(call_id=call_id, to=to):
                call = self._live(call_id)
                detail["to"] = await self._transfer(call, to)
            case _:
                raise ControlError("invalid", f"{type(command).__name__} is not a supervisor command")
        return {"call_id": call_id, "mode": call.mode, "operator": call.operator}

    def _live(self, call_id: str) -> CallSession:
        call = self.runtime.calls.get(call_id)
        if call is None:
            raise ControlError("not_found", f"no live call {call_id}")
        return call

    async def _transfer(self, call: CallSession, to: str | None) -> str:
        """Redirect the live Twilio call to ``<Dial>`` ``to`` (default: the configured transfer
        number); Twilio then ends the media stream, and the bridge ends the call here."""
        tw = self.runtime.settings.twilio
        if to is not None and not E164.fullmatch(to):
            raise ControlError("invalid", f"{to!r} is not an E.164 number (e.g. +14155550123)")
        number = to or tw.transfer_number
        if not number or not E164.fullmatch(number):
            raise ControlError(
                "unavailable", "no number given and no valid twilio.transfer_number (E.164) is configured"
            )
        if call.source != "twilio":
            raise ControlError("unavailable", f"a {call.source} call cannot be transferred")
        if twilio_rest.credentials(tw) is None:
            raise ControlError("unavailable", "Twilio credentials (account_sid, auth_token) are not configured")
        twiml = f"<Response><Dial>{escape(number)}</Dial></Response>"
        try:
            async with twilio_rest.open_client(tw, timeout_s=TRANSFER_TIMEOUT_S) as client:
                await client.update_call(call.call_id, twiml=twiml)
        except twilio_rest.TwilioUnreachable as exc:
            raise ControlError("failed", f"Twilio could not be reached: {exc}") from None
        except twilio_rest.TwilioError as exc:
            raise ControlError("failed", f"Twilio refused the transfer: {exc}") from None
        return number

    async def _set_node_state(self, state: str) -> dict[str, Any]:
        """Drain or resume this node (a fleet console's action on the node a call is on)."""
        apply = getattr(self.runtime, "set_node_state", None)
        if apply is None:
            raise ControlError("unavailable", "this runtime is not a fleet node")
        await apply(state)
        return {"node_id": self.runtime.node_id, "state": state}

    async def _start_local_call(self) -> dict[str, Any]:
        return {"call_id": await self.runtime.start_local_call()}

    def _prune_taps(self) -> None:
        """Forget taps of calls that have ended (the session dropped them with itself)."""
        for key in [k for k in self._taps if self.runtime.calls.get(k[1]) is None]:
            del self._taps[key]

    # ------------------------------------------------------------------------------ audit

    def _audit(
        self, actor: str, role: str, action: str, call_id: str | None, detail: dict[str, Any], result: str
    ) -> None:
        """Tell every console through the bus and queue the audit_log row.

        The row goes through the database's single writer (durable once committed, a few ms
        later); the answer does not wait for that commit, because a takeover's answer is on
        the path of the operator's first words to the caller."""
        at = time.time()
        self.runtime.bus.publish(SupervisorActed(actor=actor, action=action, call_id=call_id, result=result, at=at))
        db = self.runtime.db
        if db is None:
            return
        from engine.store import audit

        try:
            future = audit.record(
                db, actor=actor, role=role, action=action, call_id=call_id, detail=detail or None, result=result, at=at
            )
        except Exception:  # the store is closed (runtime stopping): say so, keep the answer
            log.exception("could not queue audit_log for %s by %s", action, actor)
            return
        future.add_done_callback(audit.log_failure)


def _quietly(remove: Callable[[], None]) -> None:
    try:
        remove()
    except Exception:
        log.exception("removing a listen tap failed")
