"""`?`: the keys of the screen underneath, in a modal."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", key_display="?"),
    ]

    def __init__(self, keys: list[tuple[str, str]], title: str = "Keys") -> None:
        super().__init__()
        self.keys = keys
        self.title_text = title

    def compose(self) -> ComposeResult:
        table = Table(title=self.title_text, show_header=False, box=None, padding=(0, 2))
        table.add_column("key", style="bold cyan", no_wrap=True)
        table.add_column("action")
        for key, description in self.keys:
            table.add_row(key, description)
        with VerticalScroll(id="help-box"):  # scrolls where the terminal is shorter than the list
            yield Static(table, id="help-keys")
            yield Static("[dim]escape or ? closes this help[/]")
