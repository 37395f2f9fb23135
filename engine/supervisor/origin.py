"""Which web pages may open the supervisor WebSocket: the ``Origin`` check.

A browser lets any page it shows open a WebSocket to any address, and sends the page's origin
along; the socket's own token is what keeps strangers out, but a page from elsewhere must not
even get to try tokens (or ride on a proxy's authentication) from an operator's browser. So an
upgrade that carries an ``Origin`` is accepted only when that origin is the one the dashboard
itself is served from (the same host and port the request was addressed to, by ``Host``), or one
listed in ``supervisor.allowed_origins`` (for a reverse proxy that rewrites ``Host``). An upgrade
without ``Origin`` comes from a program, not a web page (``xswarm attach``, scripts): browsers
always send one, so leaving it out is no way around the check. (A page whose own host name an
attacker points at this node, DNS rebinding, passes as the page's own; it still needs a token,
which it does not have, and the failed-login limit applies to it as to anyone.)
"""

from __future__ import annotations

from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


class OriginError(ValueError):
    """A configured origin is not ``http(s)://host[:port]``."""


def normalize(origin: str) -> str:
    """``HTTPS://Console.Example.com:443`` -> ``https://console.example.com``: the form origins compare in.

    Raises OriginError for anything that is not an http(s) origin (a path, a query, a user)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        raise OriginError(f"not an origin: {origin!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise OriginError(f"not an http(s) origin: {origin!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise OriginError(f"an origin has no path, query or user: {origin!r}")
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def allowed(origin: str | None, host: str | None, extra: frozenset[str] = frozenset()) -> bool:
    """May a WebSocket upgrade with this ``Origin`` and ``Host`` header go ahead?

    ``extra`` holds normalized origins from ``supervisor.allowed_origins``."""
    if origin is None:
        return True  # not a browser (see the module docstring)
    try:
        given = normalize(origin)
    except OriginError:
        return False  # "null" (sandboxed frames, file: pages) and anything malformed
    if given in extra:
        return True
    if not host:
        return False
    scheme = given.split("://", 1)[0]
    try:
        return normalize(f"{scheme}://{host}") == given
    except OriginError:
        return False
