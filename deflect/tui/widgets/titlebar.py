"""One line at the top: the database shown, and a database error while there is one.

A plain Static rather than Textual's Header: nothing here watches app reactives, so a screen that
is switched away right after it mounts has no callback left to run on removed children."""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import Static


class TitleBar(Static):
    DEFAULT_CSS = """
    TitleBar { dock: top; height: 1; padding: 0 1; background: $panel; text-style: bold; }
    """

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.error: str | None = ""
        self.show_error(None)

    def show_error(self, error: str | None) -> None:
        if error == self.error:
            return
        self.error = error
        text = f"deflect · {escape(self.where)}"
        self.update(text + (f" · [red]database error: {escape(error)}[/]" if error else ""))
