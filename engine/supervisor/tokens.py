"""Supervisor token rotation without a restart: add a token, move the consoles, retire the old.

The tokens live in ``<config>/supervisor-tokens.json`` (``engine.supervisor.auth``), a list per
role, newest last. ``add`` and ``retire`` rewrite that file atomically (a temporary file in the
same folder, mode 0600, renamed over it), so a node reading it never sees half a file. A
running node notices the change within ``TokenWatch``'s poll (the supervisor server looks
every second), accepts the new set at once and closes every console still logged in with a
retired token (close code 4401).

Why the file and not a signal: the same file is read by every process on the box (``xswarm
serve``, the console's embedded runtime, ``xswarm supervisor token``), and a change needs no
process id. A role whose token is set in the settings (``XSWARM_SUPERVISOR_TOKEN``) is fixed
for the life of the process; these functions refuse to touch it and say so.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from engine.config import Settings
from engine.files import write_atomically
from engine.paths import Paths
from engine.supervisor.auth import ROLES, AuthConfigError, Role, fingerprint, load_tokens, token_file, token_list


@dataclass(frozen=True)
class TokenEntry:
    role: Role
    fingerprint: str
    newest: bool
    """The one ``xswarm supervisor token`` prints (what new consoles should use)."""
    source: str


def entries(settings: Settings, paths: Paths | None = None) -> list[TokenEntry]:
    """Every accepted token, by role, without the tokens themselves."""
    tokens = load_tokens(settings, paths)
    out = []
    for role in ROLES:
        valid = tokens.valid(role)
        for index, value in enumerate(valid):
            out.append(TokenEntry(role, fingerprint(value), index == len(valid) - 1, tokens.source[role]))
    return out


def add(settings: Settings, role: Role, paths: Paths | None = None) -> str:
    """Create a token for ``role`` beside the existing ones (all stay valid); returns it."""
    tokens = load_tokens(settings, paths)  # creates the file on a fresh box
    _refuse_settings(tokens.source[role], role)
    path = token_file(paths)
    data = _read(path)
    token = secrets.token_urlsafe(32)
    data[role] = [*token_list(data[role]), token]
    _write(path, data)
    return token


def retire(settings: Settings, wanted: str, paths: Paths | None = None) -> TokenEntry:
    """Stop accepting the token whose fingerprint starts with ``wanted``. Refuses an ambiguous
    prefix, an unknown one, and the last token of a role (nobody could log in as it)."""
    if len(wanted) < 4:
        raise AuthConfigError("give at least 4 characters of the fingerprint (`xswarm supervisor tokens`)")
    matches = [e for e in entries(settings, paths) if e.fingerprint.startswith(wanted.lower())]
    if not matches:
        raise AuthConfigError(f"no supervisor token has a fingerprint starting with {wanted!r}")
    if len(matches) > 1:
        raise AuthConfigError(f"{wanted!r} matches {len(matches)} tokens; give more of the fingerprint")
    entry = matches[0]
    _refuse_settings(entry.source, entry.role)
    path = token_file(paths)
    data = _read(path)
    kept = [value for value in token_list(data[entry.role]) if fingerprint(value) != entry.fingerprint]
    if not kept:
        raise AuthConfigError(f"that is the only {entry.role} token: add another first (`xswarm supervisor add-token`)")
    data[entry.role] = kept
    _write(path, data)
    return entry


class TokenWatch:
    """Tells whether the token file changed since the last look (a ``stat``, no read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        return True


def _refuse_settings(source: str, role: Role) -> None:
    if source == "settings":
        variable = "XSWARM_SUPERVISOR_TOKEN" if role == "operator" else "XSWARM_SUPERVISOR_MONITOR_TOKEN"
        raise AuthConfigError(
            f"the {role} token comes from the settings ({variable} or config.toml), which a running node does"
            " not re-read: unset it to keep the token in the token file, which rotates without a restart"
        )


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuthConfigError(f"{path}: cannot read supervisor tokens ({exc})") from None
    if not isinstance(data, dict):
        raise AuthConfigError(f"{path}: not a token file")
    return data


def _write(path: Path, data: dict[str, object]) -> None:
    write_atomically(path, json.dumps(data).encode())  # 0600, like the file it replaces
