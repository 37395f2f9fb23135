"""HTTP answers served beside a WebSocket: ``GET /health``, ``GET /metrics``.

The bridge and the supervisor server answer plain HTTP requests in websockets'
``process_request`` hook, before any upgrade; these build those answers from the
connection's own (which carries Date, Server and ``Connection: close``).
"""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response


def json_response(conn: ServerConnection, status: int, body: dict[str, Any]) -> Response:
    """``body`` as JSON; never cached (a health answer is only true now)."""
    response = with_body(conn.respond(status, ""), json.dumps(body).encode(), "application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def with_body(response: Response, body: bytes, content_type: str) -> Response:
    """``response`` with ``body`` of ``content_type`` in place of its own."""
    headers = Headers(
        (k, v) for k, v in response.headers.raw_items() if k.lower() not in ("content-type", "content-length")
    )
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    return Response(response.status_code, response.reason_phrase, headers, body)
