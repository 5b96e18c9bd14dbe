"""A transfer matrix as a Rich table with cells coloured by accuracy, white-box diagonal marked."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from textual.widgets import Static

from deflect.console import accuracy_style


def heatmap_table(matrix: Sequence[Sequence[float]], clean: Sequence[float] | None = None,
                  row_labels: Sequence[str] | None = None, title: str | None = None) -> Table:
    """Rows: the model an attack was crafted on; columns: the model it was scored on (accuracy %).

    Diagonal cells (white-box when the matrix is square) are underlined and starred; a last row
    gives each target model's clean accuracy."""
    cols = len(matrix[0]) if matrix else 0
    labels = list(row_labels) if row_labels else [f"m{i}" for i in range(len(matrix))]
    square = len(matrix) == cols and not row_labels
    table = Table(title=title, header_style="bold", caption="* white-box" if square else None,
                  caption_justify="left")
    table.add_column("src\\tgt", no_wrap=True)
    for c in range(cols):
        table.add_column(f"m{c}", justify="right", no_wrap=True)
    for r, row in enumerate(matrix):
        cells = []
        for c, value in enumerate(row):
            white = square and r == c
            style = accuracy_style(value) + (" underline" if white else "")
            cells.append(f"[{style}]{value:.1f}{'*' if white else ' '}[/]")
        table.add_row(labels[r], *cells)
    if clean:
        table.add_section()
        table.add_row("clean", *(f"[{accuracy_style(v)}]{v:.1f} [/]" for v in clean))
    return table


class Heatmap(Static):
    """Shows one matrix; `show(None, message)` shows a message instead."""

    DEFAULT_CSS = """
    Heatmap { width: auto; height: auto; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.matrix: list[list[float]] | None = None

    def show(self, matrix: Sequence[Sequence[float]] | None, message: str = "",
             clean: Sequence[float] | None = None, row_labels: Sequence[str] | None = None,
             title: str | None = None) -> None:
        self.matrix = [list(map(float, row)) for row in matrix] if matrix else None
        if self.matrix:
            self.update(heatmap_table(self.matrix, clean, row_labels, title))
        else:
            self.update(message)
