"""Call tokens carry who calls and are used once, across restarts and nodes (issue 13, item 7).

Before: the token bound only the CallSid, so ``user_id``, ``caller`` and ``theme`` came from
the caller's own ``start`` message (a spoofed ``calls`` row was written), and used tokens were
remembered in memory only, so one worked again after a restart within its TTL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from test_bridge import TOKEN_SECRET, Twilio, env, start_runtime, token, wait_for

from engine import events
from engine.runtime import Runtime

__all__ = ["env"]  # the fixture, shared with test_bridge
from engine.store import calltokens
from engine.telephony.calltoken import Claims, TokenError, mint, verify

CALL = "CA" + "4" * 32


@pytest.fixture
def node(env: None) -> Iterator[Runtime]:
    runtime, _ = start_runtime()
    yield runtime
    runtime.stop()


def test_claims_are_signed() -> None:
    tok = mint(TOKEN_SECRET, CALL, claims=Claims("u-1", "+15551230001", "kitt"))
    assert verify(TOKEN_SECRET, tok, CALL).claims == Claims("u-1", "+15551230001", "kitt")
    forged_claims = mint(TOKEN_SECRET, CALL, claims=Claims("u-2", "+15551230001", "kitt")).split(".")[3]
    parts = tok.split(".")
    parts[3] = forged_claims  # someone else's claims under this token's signature
    with pytest.raises(TokenError, match="does not match"):
        verify(TOKEN_SECRET, ".".join(parts), CALL)
    with pytest.raises(TokenError, match="malformed"):
        verify(TOKEN_SECRET, "ct2." + "1" * 5000, CALL)


async def test_the_bridge_takes_who_calls_from_the_token_not_the_start_message(node: Runtime) -> None:
    twilio = Twilio(node.bridge_port, call_sid=CALL)  # type: ignore[arg-type]
    await twilio.open()
    await twilio.connected()
    await twilio.start(
        token(CALL, claims=Claims("u-real", "+15551230001", "kitt")),
        user_id="u-spoofed",
        caller="+19999999999",
        theme="spoofed",
    )
    await wait_for(lambda: node.calls.get(CALL) is not None)
    session = node.calls.get(CALL)
    assert session is not None
    assert (session.user_id, session.caller, session.theme) == ("u-real", "+15551230001", "kitt")
    await twilio.stop()
    await twilio.closed()
    assert node.db is not None

    def row() -> list[tuple[str | None, str | None, str | None]]:
        return node.db.query("SELECT user_id, caller, theme FROM calls WHERE id = ?", (CALL,))  # type: ignore[union-attr]

    await wait_for(lambda: bool(row()))
    assert row() == [("u-real", "+15551230001", "kitt")]


async def _place(runtime: Runtime, tok: str) -> tuple[int | None, str]:
    """Start a stream with ``tok``; once it is live, hang up. Returns how the socket closed."""
    twilio = Twilio(runtime.bridge_port, call_sid=CALL)  # type: ignore[arg-type]
    await twilio.open()
    await twilio.start(tok)
    await wait_for(lambda: runtime.calls.get(CALL) is not None or twilio.ws.close_code is not None)  # type: ignore[union-attr]
    if runtime.calls.get(CALL) is not None:
        await twilio.stop()
    return await twilio.closed()


def test_a_used_token_stays_used_after_a_restart(env: None) -> None:
    tok = token(CALL)
    first, _ = start_runtime()
    try:
        assert asyncio.run(_place(first, tok))[0] == 1000  # used, then hung up normally
    finally:
        first.stop()
    second, _ = start_runtime()  # same database, within the token's TTL
    try:
        code, reason = asyncio.run(_place(second, tok))
        assert code == 4003 and "already used" in reason
    finally:
        second.stop()


async def test_a_token_another_node_used_ends_the_call(node: Runtime) -> None:
    tok = token(CALL)
    assert node.db is not None
    nonce = verify(TOKEN_SECRET, tok, CALL)
    await asyncio.wrap_future(calltokens.record(node.db, nonce.nonce, nonce.expires))  # the other node's burn
    seen: list[events.Event] = []
    node.bus.subscribe(seen.append)
    twilio = Twilio(node.bridge_port, call_sid=CALL)  # type: ignore[arg-type]
    await twilio.open()
    await twilio.start(tok)
    code, reason = await twilio.closed()
    assert "already used" in reason
    assert any(isinstance(e, events.CallRefused) and e.reason == "bad_token" for e in seen)
