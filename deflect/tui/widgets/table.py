"""A DataTable that repaints once its columns are measured.

Textual measures new rows' column widths when the table's message queue goes idle, but lines
rendered before that are cached under the same update count and can be painted again with the
columns still at their labels' widths ("dig" for a run id). On a machine busy training, which is
when the dashboard is open, that picture can stay until the next change. Clearing the render
caches right after a measurement makes the next paint use the measured widths.
"""

from __future__ import annotations

from textual import events
from textual.widgets import DataTable


class MeasuredTable(DataTable):
    """DataTable whose render caches are dropped after every column measurement."""

    async def _on_idle(self, event: events.Idle) -> None:
        pending = bool(getattr(self, "_require_update_dimensions", False) or getattr(self, "_updated_cells", None))
        await super()._on_idle(event)
        clear = getattr(self, "_clear_caches", None)
        if pending and clear is not None:  # private in Textual: skip quietly if a release drops it
            clear()
