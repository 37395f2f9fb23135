"""One statement against a remote libSQL server (sqld, Turso) as ONE asynchronous HTTP request.

The database's own path for a remote server is the ``libsql`` client on the writer thread
(see ``engine.store.db``). That is right for everything that can wait a few milliseconds, but
not for the routing decision of a ringing call: through the writer it is BEGIN, the statement
and COMMIT (three round trips) queued behind every other write, and ``libsql`` holds the GIL
while a request is in flight, so decisions made together also wait for each other
(docs/performance.md, "Fleet").

This speaks the documented Hrana-over-HTTP pipeline (``POST /v2/pipeline``: one ``execute``
and a ``close``), which sqld and Turso both serve: one statement, committed by itself, on the
caller's event loop with the caller's ``aiohttp`` session. Only for statements that are atomic
alone and safe to repeat.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import aiohttp

from engine.store.db import StoreError, Target


def _arg(value: Any) -> dict[str, Any]:
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "integer", "value": str(int(value))}
    if isinstance(value, int):
        return {"type": "integer", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, bytes):
        return {"type": "blob", "base64": base64.b64encode(value).decode()}
    return {"type": "text", "value": str(value)}


def _value(cell: dict[str, Any]) -> Any:
    kind = cell.get("type")
    if kind == "integer":
        return int(cell["value"])
    if kind == "float":
        return float(cell["value"])
    if kind == "text":
        return cell["value"]
    if kind == "blob":
        return base64.b64decode(cell["base64"])
    return None


async def execute(
    session: aiohttp.ClientSession, target: Target, sql: str, params: Sequence[Any] = (), *, timeout_s: float = 5.0
) -> list[tuple[Any, ...]]:
    """Run ``sql`` on ``target`` (a remote one) and return its rows; ``StoreError`` on failure."""
    body = {
        "requests": [
            {"type": "execute", "stmt": {"sql": sql, "args": [_arg(v) for v in params]}},
            {"type": "close"},
        ]
    }
    headers = {"Authorization": f"Bearer {target.auth_token}"} if target.auth_token else {}
    url = target.location.rstrip("/") + "/v2/pipeline"
    try:
        async with session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            if response.status != 200:
                raise StoreError(f"{target.describe()} answered {response.status}: {(await response.text())[:200]}")
            answer = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise StoreError(f"cannot reach {target.describe()}: {exc}") from exc
    try:
        first = answer["results"][0]
        if first.get("type") != "ok":
            raise StoreError(str((first.get("error") or {}).get("message") or first))
        rows = first["response"]["result"]["rows"]
        return [tuple(_value(cell) for cell in row) for row in rows]
    except (KeyError, IndexError, TypeError) as exc:
        raise StoreError(f"unexpected answer from {target.describe()}: {exc}") from exc
