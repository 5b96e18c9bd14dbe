"""One run's newest transfer matrix per attack, refreshed while `deflect evaluate` adds more."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import ScrollableContainer
from textual.message import Message
from textual.widgets import Footer, Static
from textual.worker import Worker, get_current_worker

from deflect.store import Evaluation, Run, Store
from deflect.tui.data import MatrixData, load_matrix
from deflect.tui.screens.polling import PollingScreen
from deflect.tui.widgets.heatmap import Heatmap
from deflect.tui.widgets.titlebar import TitleBar


def figure_path(store: Store, run: Run, ev: Evaluation) -> Path:
    """Where `e` writes the PNG: the run's figures/ folder, named as `deflect export` names it."""
    from deflect.pipeline import figures_dir  # torch and the attacks, only when a PNG is asked for

    return figures_dir(store, run) / f"{run.id}-{ev.kind}-{ev.attack}-{ev.id}.png"


def summary_text(ev: Evaluation) -> str:
    def pct(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else "-"

    bb = f"{pct(ev.blackbox_mean)} ± {pct(ev.blackbox_std)}" if ev.blackbox_mean is not None else "-"
    clean = " ".join(f"{v:.1f}" for v in ev.clean_acc or []) or "-"
    return (f"black-box [b]{bb}[/] %  ·  whole set {pct(ev.whole_set_mean)} %  ·  white-box {pct(ev.whitebox_mean)} %\n"
            f"clean {clean} %  ·  {ev.n_examples} images  ·  {ev.created:%Y-%m-%d %H:%M}")


class MatrixScreen(PollingScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("left_square_bracket", "switch_attack(-1)", "Prev attack", key_display="["),
        Binding("right_square_bracket", "switch_attack(1)", "Next attack", key_display="]"),
        Binding("a", "switch_attack(1)", "Next attack", show=False),
        Binding("e", "export", "Export PNG"),
        Binding("g", "game", "Attacker game"),
    ]

    @dataclass
    class Loaded(Message):
        data: MatrixData | None
        error: str | None = None

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.run: Run | None = None
        self.evaluations: dict[str, Evaluation] = {}
        self.attack: str | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar(str(self.app.store.path))  # type: ignore[attr-defined]
        # both ways: a set of 9 or more is wider than 80 columns (arrow keys scroll once it has focus)
        with ScrollableContainer(id="matrix-body"):
            yield Static(f"[b]{self.run_id}[/] · loading…", id="matrix-title")
            yield Heatmap(id="heatmap")
            yield Static("", id="matrix-summary")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.start_polling()

    def start_poll(self) -> Worker[None]:
        return self.poll()

    @work(thread=True, exclusive=True, group="matrix-poll")
    def poll(self) -> None:
        try:
            data = load_matrix(self.app.store, self.run_id)  # type: ignore[attr-defined]
        except Exception as exc:  # a locked or broken database: show it, try again next tick
            if not get_current_worker().is_cancelled:
                self.post_message(self.Loaded(None, str(exc).splitlines()[0]))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(self.Loaded(data))

    def on_matrix_screen_loaded(self, message: Loaded) -> None:
        if message.data is None:
            self.query_one(TitleBar).show_error(message.error)
            return
        self.query_one(TitleBar).show_error(None)
        new, old = message.data.evaluations, self.evaluations
        changed = {a: e.id for a, e in new.items()} != {a: e.id for a, e in old.items()} or self.run is None
        self.run, self.evaluations = message.data.run, message.data.evaluations
        if self.attack not in self.evaluations:
            self.attack = next(iter(self.evaluations), None)
        if changed:
            self.render_matrix()

    def action_switch_attack(self, step: int) -> None:
        attacks = list(self.evaluations)
        if not attacks:
            return
        index = attacks.index(self.attack) if self.attack in attacks else 0
        self.attack = attacks[(index + step) % len(attacks)]
        self.render_matrix()

    @property
    def current(self) -> Evaluation | None:
        return self.evaluations.get(self.attack) if self.attack else None

    def render_matrix(self) -> None:
        title = self.query_one("#matrix-title", Static)
        heatmap = self.query_one("#heatmap", Heatmap)
        summary = self.query_one("#matrix-summary", Static)
        if self.run is None:
            title.update(f"[red]run {self.run_id} is no longer in the database[/]")
            heatmap.show(None)
            summary.update("")
            return
        ev = self.current
        if ev is None or not ev.matrix:
            # in the title, which wraps at the screen's width (the heatmap is as wide as its table)
            title.update(f"[b]{self.run_id}[/] · no transfer evaluation yet\n\nEvaluate it in another terminal:  "
                         f"deflect evaluate {self.run_id} --attack pgd1\n"
                         "This screen fills in as evaluations are stored.")
            heatmap.show(None)
            summary.update("")
            return
        attacks = "  ".join(f"[reverse]{a}[/]" if a == self.attack else a for a in self.evaluations)
        title.update(f"[b]{self.run_id}[/] · accuracy % under attack · {attacks}")
        heatmap.show(ev.matrix, clean=ev.clean_acc, row_labels=(ev.extra or {}).get("row_labels"))
        summary.update(summary_text(ev))

    def action_game(self) -> None:
        from deflect.tui.screens.game import GameScreen

        self.app.push_screen(GameScreen(self.run_id))

    def action_export(self) -> None:
        if self.run is None or self.current is None or not self.current.matrix:
            self.notify("nothing to export yet", severity="warning")
            return
        self.export(self.run, self.current)

    @work(thread=True, exclusive=True, group="matrix-export")
    def export(self, run: Run, ev: Evaluation) -> None:
        from deflect.report import heatmap_png

        try:
            path = figure_path(self.app.store, run, ev)  # type: ignore[attr-defined]
            heatmap_png(ev.matrix or [], path, f"{run.id}: {ev.attack}", row_labels=(ev.extra or {}).get("row_labels"))
        except Exception as exc:  # a full disk or unwritable folder: tell the user, keep the dashboard
            self.app.call_from_thread(self.notify, f"export failed: {exc}", severity="error")
            return
        self.app.call_from_thread(self.notify, f"wrote {path}", title="PNG exported")
