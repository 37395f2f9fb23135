"""The browser dashboard's files, served on the supervisor port: ``GET /`` and ``GET /static/…``.

The page is plain HTML, CSS and JavaScript modules kept in ``engine/supervisor/www/`` (package
data; no build step, nothing fetched from another origin). It speaks supervisor protocol v1 over
the same port's WebSocket like any other client, so the server adds nothing but these files.

The files are read once, when the server starts, into a name -> bytes table: a request can only
ever name one of them, so no path from a request reaches the file system. Every answer carries
the headers that keep the page to itself: a Content-Security-Policy that allows scripts, styles
and connections only from this origin (WebSocket included) and no framing, ``nosniff``, no
referrer, and no caching of the page (a new version is picked up on reload).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

STATIC_PREFIX = "/static/"
INDEX = "index.html"
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg)$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
"""A Host header we will repeat inside the CSP (anything else falls back to plain 'self')."""


def csp(host: str | None) -> str:
    """The page's Content-Security-Policy. ``connect-src`` names ws:// and wss:// of the host the
    page was asked for, because older browsers do not count WebSocket URLs as 'self'."""
    sockets = f" ws://{host} wss://{host}" if host and _HOST.match(host) else ""
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self'{sockets}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Permissions-Policy", "microphone=(self), camera=(), geolocation=()"),
    ("Cache-Control", "no-cache"),
)


@dataclass(frozen=True)
class StaticFiles:
    """The dashboard's files by name, loaded once."""

    files: dict[str, bytes]

    @classmethod
    def load(cls) -> StaticFiles:
        folder = resources.files("engine.supervisor") / "www"
        files = {entry.name: entry.read_bytes() for entry in folder.iterdir() if _NAME.match(entry.name)}
        if INDEX not in files:
            raise FileNotFoundError(f"the dashboard's {INDEX} is missing from the package")
        return cls(files)

    def response(self, request: Request) -> Response | None:
        """The answer for a plain GET of ``/`` or ``/static/<name>``; None for any other path."""
        path = request.path.split("?", 1)[0]
        if path == "/":
            name = INDEX
        elif path.startswith(STATIC_PREFIX):
            name = path[len(STATIC_PREFIX) :]
            if name not in self.files or name == INDEX:
                return _response(404, b"no such file\n", "text/plain; charset=utf-8", request)
        else:
            return None
        body = self.files[name]
        return _response(200, body, _CONTENT_TYPES[name[name.rindex(".") :]], request)


def is_upgrade(request: Request) -> bool:
    """A WebSocket handshake, as opposed to a browser fetching the page."""
    return "websocket" in request.headers.get("Upgrade", "").lower()


def _response(status: int, body: bytes, content_type: str, request: Request) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Content-Security-Policy"] = csp(request.headers.get("Host"))
    for key, value in SECURITY_HEADERS:
        headers[key] = value
    reason = {200: "OK", 404: "Not Found"}[status]
    return Response(status, reason, headers, body)
