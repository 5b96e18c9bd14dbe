"""Every run, refreshed from the database each second; the highlighted run's clean-accuracy curve."""

from __future__ import annotations

from dataclasses import dataclass

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Footer, Sparkline, Static
from textual.worker import Worker, get_current_worker

from deflect.tui.data import RunDetail, RunRow, load_detail, load_runs
from deflect.tui.screens.polling import PollingScreen
from deflect.tui.widgets.table import MeasuredTable
from deflect.tui.widgets.titlebar import TitleBar

# The numbers first, so that they stay in view at 80 columns; the rest scrolls horizontally.
COLUMNS = (("id", "run"), ("status", "status"), ("epoch", "epoch"), ("clean", "clean %"), ("bb", "worst BB %"),
           ("method", "method"), ("dataset", "data"), ("arch", "arch"), ("n", "n"))
STATUS_COLOURS = {"finished": "green", "running": "yellow", "failed": "red", "interrupted": "magenta"}


def _pct(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def row_cells(row: RunRow) -> dict[str, str]:
    return {
        "id": row.id, "method": row.method, "dataset": row.dataset, "arch": row.arch, "n": str(row.n),
        "status": f"[{STATUS_COLOURS.get(row.status, 'white')}]{row.status}[/]",
        "epoch": f"{row.epochs_done}/{row.epochs_total}", "clean": _pct(row.clean), "bb": _pct(row.worst_blackbox),
    }


class RunsScreen(PollingScreen):
    BINDINGS = [
        Binding("enter", "open_matrix", "Matrix", priority=True),
        Binding("g", "game", "Attacker game"),
        Binding("r", "poll", "Refresh"),
        Binding("s", "app.replay", "Replay"),
    ]

    @dataclass
    class Loaded(Message):
        rows: list[RunRow]
        detail: RunDetail | None
        error: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.selected: str | None = None
        self.rows: dict[str, RunRow] = {}

    def compose(self) -> ComposeResult:
        yield TitleBar(str(self.app.store.path))  # type: ignore[attr-defined]
        yield MeasuredTable(id="runs", cursor_type="row", zebra_stripes=True)
        with Vertical(id="detail"):
            yield Static("", id="detail-title")
            yield Sparkline([], id="curve")
            yield Static("", id="losses")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one("#runs", DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        self.start_polling()

    def start_poll(self) -> Worker[None]:
        return self.poll(self.selected)

    def action_poll(self) -> None:
        self.refresh_data()

    @work(thread=True, exclusive=True, group="runs-poll")
    def poll(self, selected: str | None) -> None:
        store = self.app.store  # type: ignore[attr-defined]
        try:
            rows = load_runs(store)
            ids = [r.id for r in rows]
            if selected not in ids:
                selected = ids[0] if ids else None
            detail = load_detail(store, selected) if selected else None
        except Exception as exc:  # a locked or broken database: show it, try again next tick
            if not get_current_worker().is_cancelled:
                self.post_message(self.Loaded([], None, str(exc).splitlines()[0]))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(self.Loaded(rows, detail))

    def on_runs_screen_loaded(self, message: Loaded) -> None:
        if message.error:
            self.query_one(TitleBar).show_error(message.error)
            return
        self.query_one(TitleBar).show_error(None)
        table = self.query_one("#runs", DataTable)
        fresh = {row.id: row for row in message.rows}
        added = False
        for run_id in [key.value for key in table.rows if key.value not in fresh]:
            table.remove_row(run_id)
        for row in message.rows:
            cells = row_cells(row)
            if row.id in table.rows:
                if self.rows.get(row.id) != row:
                    for key, value in cells.items():
                        table.update_cell(row.id, key, value)
            else:
                table.add_row(*(cells[key] for key, _ in COLUMNS), key=row.id)
                added = True
        if added:  # new rows can widen columns: redraw the rows already shown with the new widths
            table.refresh(layout=True)
        self.rows = fresh
        if message.detail is not None and message.detail.run_id == self._cursor_run():
            self.show_detail(message.detail)

    def _cursor_run(self) -> str | None:
        table = self.query_one("#runs", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def show_detail(self, detail: RunDetail) -> None:
        last = f" · last {detail.curve[-1]:.1f} %" if detail.curve else " · no epoch yet"
        self.query_one("#detail-title", Static).update(f"[b]{detail.run_id}[/] mean clean accuracy per epoch{last}")
        self.query_one("#curve", Sparkline).data = detail.curve
        if detail.epoch is None:
            losses = "[dim]no epochs recorded yet[/]"
        else:
            losses = f"epoch {detail.epoch}  " + "  ".join(f"{k} {v:.3f}" for k, v in detail.losses.items())
        self.query_one("#losses", Static).update(losses)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.selected = event.row_key.value
        self.action_poll()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.selected = event.row_key.value
        self.action_open_matrix()

    def action_open_matrix(self) -> None:
        run_id = self._cursor_run()
        if run_id is None:
            return
        from deflect.tui.screens.matrix import MatrixScreen

        self.app.push_screen(MatrixScreen(run_id))

    def action_game(self) -> None:
        run_id = self._cursor_run()
        if run_id is None:
            return
        from deflect.tui.screens.game import GameScreen

        self.app.push_screen(GameScreen(run_id))
