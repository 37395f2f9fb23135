"""What the calls board says when there are no calls: how to place one, and what listens.

A newcomer's first question on an empty board is "is this working, and how do I test it?".
The answer uses this node's own ports from its snapshot, so the commands can be pasted as is.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static


def empty_board_text(node: dict[str, Any], model: str | None, *, attached: bool, can_act: bool) -> Text:
    """The empty-board guide for this node (``node``: the snapshot's id and ports)."""
    out = Text()
    out.append("No live calls.", style="bold")
    if model:  # in full: why `auto` fell back to echo is the first thing a newcomer needs
        out.append(f"\nModel: {model}")
    out.append("\n\n")
    bridge, supervisor, webhooks = (node.get(k) for k in ("bridge_port", "supervisor_port", "webhooks_port"))
    host = "127.0.0.1"
    if bridge:
        out.append("Place a test call into this node's bridge, as Twilio would:\n")
        out.append(f"  xswarm call --bridge ws://{host}:{bridge}/twilio\n", style="bold")
        if webhooks:
            out.append("or through the signed voice webhook first:\n")
            out.append(f"  xswarm call --webhooks http://{host}:{webhooks}\n", style="bold")
        out.append("(run them on the node; they need TWILIO_AUTH_TOKEN and XSWARM_CALL_TOKEN_SECRET set)\n")
    else:
        out.append("Place a test call: xswarm call (see xswarm call --help)\n")
    if can_act and not attached:
        out.append("Or press ")
        out.append("v", style="bold")
        out.append(" to talk to the AI with this machine's microphone.\n")
    ports = (("bridge", bridge), ("supervisor", supervisor), ("webhooks", webhooks))
    listening = [f"{name} :{port}" for name, port in ports if port]
    out.append("\nListening: " + (" · ".join(listening) if listening else "ports not reported yet"), style="dim")
    return out


class EmptyBoard(Static):
    """Shown instead of an empty table; hidden as soon as a call is on the board."""
