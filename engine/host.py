"""What every server the runtime hosts reads of it.

Each server declares its own small Protocol of what it uses of the runtime (``BridgeHost``,
``ControlHost``, ``MetricsHost``, ``StorageHost``), so none imports the runtime; those start
from ``RuntimeHost``, the part they all share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine.calls import CallRegistry
    from engine.config import Settings
    from engine.events import EventBus


class RuntimeHost(Protocol):
    @property
    def settings(self) -> Settings: ...
    @property
    def bus(self) -> EventBus: ...
    @property
    def calls(self) -> CallRegistry: ...
    @property
    def node_id(self) -> str: ...
