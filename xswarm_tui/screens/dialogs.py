"""Small modal dialogs: confirm a destructive action; type a whisper; choose a transfer number."""

from __future__ import annotations

import re

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no; `y` or enter confirms, `n` or escape cancels."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, markup=False)  # wraps: a long question is never cut off
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # the safe answer is the default

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class WhisperScreen(ModalScreen[str | None]):
    """One line of text forced into the AI's stream on the selected call."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="whisper.cancel")]

    def __init__(self, call_id: str) -> None:
        super().__init__()
        self.call_id = call_id

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Whisper to the AI on {self.call_id} (enter sends, escape cancels)")
            yield Input(placeholder="e.g. Offer to send the invoice by email", max_length=2000, id="whisper")

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class TransferScreen(ModalScreen[str | None]):
    """Where to transfer a call: the number is shown (and editable) before anything is dialled.

    Prefilled with ``telephony.transfer_number``; enter confirms a valid E.164 number, escape
    cancels. The answer is the number, or None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="transfer.cancel")]

    def __init__(self, call_label: str, default: str | None) -> None:
        super().__init__()
        self.call_label = call_label
        self.default = default or ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Transfer {self.call_label} to this number? (enter transfers, escape cancels)", markup=False)
            yield Input(value=self.default, placeholder="+14155550123", max_length=16, id="transfer-to")
            yield Label("", id="transfer-error", markup=False)

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        number = event.value.strip().replace(" ", "")
        if not E164.match(number):
            self.query_one("#transfer-error", Label).update(f"{number or 'nothing'} is not an E.164 number")
            return
        self.dismiss(number)

    def action_cancel(self) -> None:
        self.dismiss(None)
