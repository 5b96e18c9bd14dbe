"""A horizontal deflection-rate gauge: the rate as a filled bar, its 95% interval shaded around it."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static

from deflect.console import accuracy_style


def gauge_text(rate: float | None, low: float, high: float, counted: int, width: int = 40) -> Text:
    """`█` up to the interval's low end, `▓` up to the rate, `▒` up to the high end, `░` beyond."""
    text = Text("deflected ")
    if rate is None:
        text.append("░" * width, style="dim")
        text.append("   - (no counted attack yet)")
        return text
    lo = 0 if math.isnan(low) else round(low * width)
    mid = round(rate * width)
    hi = width if math.isnan(high) else round(high * width)
    lo, mid = min(lo, mid), max(mid, lo)
    hi = max(hi, mid)
    style = accuracy_style(100 * rate)
    text.append("█" * lo, style=style)
    text.append("▓" * (mid - lo), style=style)
    text.append("▒" * (hi - mid), style="dim " + style)
    text.append("░" * (width - hi), style="dim")
    interval = "" if math.isnan(low) else f" [{100 * low:.1f}, {100 * high:.1f}]"
    text.append(f" {100 * rate:5.1f} %{interval} of {counted}")
    return text


class DeflectionGauge(Static):
    DEFAULT_CSS = """
    DeflectionGauge { height: 1; }
    """

    def show(self, rate: float | None, low: float, high: float, counted: int) -> None:
        self.update(gauge_text(rate, low, high, counted))
