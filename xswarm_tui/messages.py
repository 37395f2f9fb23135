"""App-wide messages. Facts in the past tense; every high-rate one coalesces (``can_replace``)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class EventsArrived(Message):
    """Runtime events are waiting in the app's inbox (posted from the bus thread)."""

    def can_replace(self, message: Message) -> bool:  # one wake-up drains any number of events
        return isinstance(message, EventsArrived)


@dataclass
class LogsArrived(Message):
    """Log records are waiting in the log mirror."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LogsArrived)


@dataclass
class LinkOpened(Message):
    """The runtime answered (its snapshot is in the event queue)."""


@dataclass
class LinkFailed(Message):
    """The runtime could not be started or reached; the text says why."""

    error: str
    retry: bool = False
    """Trying again later may work (the node did not answer); else only the operator can fix it."""
