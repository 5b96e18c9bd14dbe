"""A grid of clients, each a two-character cell coloured by the model it holds, attacks marked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.text import Text
from textual.widgets import Static

from deflect.simulate import DEFLECTED, SUCCEEDED, VOID

MODEL_COLOURS = ("dodger_blue2", "dark_orange3", "green4", "magenta3", "gold3", "cyan4", "orchid", "salmon1",
                 "steel_blue", "chartreuse3", "medium_purple3", "light_sea_green", "indian_red", "tan",
                 "slate_blue1", "dark_khaki")
MARKS = {SUCCEEDED: ("✗✗", "bold white on red3"), DEFLECTED: ("✓✓", "bold black on green3"),
         VOID: ("··", "bold white on grey35")}


def model_style(model: int | None) -> str:
    return "on grey15" if model is None else f"on {MODEL_COLOURS[model % len(MODEL_COLOURS)]}"


def legend(n_models: int, shown: Sequence[int] | None = None) -> Text:
    """`m0 m1 …` in their colours (only `shown` when given), then what the marks mean."""
    text = Text()
    for v in shown if shown is not None else range(n_models):
        text.append(f" m{v} ", style=model_style(v) + " bold white")
        text.append(" ")
    text.append(" ✗ fooled ", style=MARKS[SUCCEEDED][1])
    text.append(" ")
    text.append(" ✓ deflected ", style=MARKS[DEFLECTED][1])
    text.append(" ")
    text.append(" · void ", style=MARKS[VOID][1])
    return text


def grid_text(models: Sequence[int | None], marks: Mapping[int, int], columns: int = 36) -> Text:
    """One cell per client: its model's colour; a mark when an attack reached it (outcome code)."""
    text = Text()
    for client, model in enumerate(models):
        if client and client % columns == 0:
            text.append("\n")
        mark = marks.get(client)
        if mark is None:
            text.append("  ", style=model_style(model))
        else:
            chars, style = MARKS[mark]
            text.append(chars, style=style)
    return text


class ClientGrid(Static):
    DEFAULT_CSS = """
    ClientGrid { height: auto; }
    """

    def __init__(self, columns: int = 36, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.columns = columns
        self.models: list[int | None] = []
        self.marks: dict[int, int] = {}

    def show(self, models: Sequence[int | None], marks: Mapping[int, int]) -> None:
        self.models, self.marks = list(models), dict(marks)
        self.update(grid_text(self.models, self.marks, self.columns))
