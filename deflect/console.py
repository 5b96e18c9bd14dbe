"""Rich rendering shared by the CLI commands: progress bars, tables and coloured matrices."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from deflect.store import EpochMetric, Run

if TYPE_CHECKING:  # the training code loads torch, which read-only commands never need
    from deflect.train.disjoint import BatchEvent

PIPE_WIDTH = 240  # room for the widest table (`deflect runs`) in one line per row


def _pipe_width(stream: object) -> int | None:
    """PIPE_WIDTH for a stream that is not a terminal (unless `COLUMNS` says otherwise), else None
    (Rich follows the terminal)."""
    isatty = getattr(stream, "isatty", None)
    return None if "COLUMNS" in os.environ or (isatty is not None and isatty()) else PIPE_WIDTH


# logs and bars: `deflect train ... 2> train.log` and the refill logs get whole lines, not 80 folded columns
err_console = Console(stderr=True, width=_pipe_width(sys.stderr))


def stdout_console() -> Console:
    """The console for a command's tables and results (standard output).

    Off a terminal Rich assumes 80 columns and folds a wide table's cells into one letter per line,
    so `deflect runs > runs.txt` or `deflect runs | grep failed` would see no whole row. Written to a
    file or a pipe, deflect's output keeps its natural width instead; `COLUMNS` still decides.
    """
    return Console(width=_pipe_width(sys.stdout))


def result_console(live: Console) -> Console:
    """Where a command prints its results while `live` (standard error) shows a progress bar.

    Results belong on standard output, so `deflect evaluate RUN > eval.txt` keeps its matrices (while
    a bar is live Rich swaps `sys.stdout` for a proxy, but a Console writes to the file behind it).
    When both streams are the terminal, results go through the live console, which redraws the bar
    below them; with `2> log` they stay on the terminal.
    """
    return live if live.is_terminal and sys.stdout.isatty() else stdout_console()


class _Progress(Progress):
    """A bar that leaves nothing behind when it stops before its first task: an error raised before
    any work (a bad value found once the run is open) stays the one line on stderr."""

    def stop(self) -> None:
        if self.tasks:
            super().stop()
            return
        self.live.transient = True  # and no closing newline, which Progress.stop adds off a terminal
        self.live.stop()


def training_progress(console: Console = err_console) -> Progress:
    """Epoch, batch, losses, throughput and ETA for a training run."""
    return _epoch_progress(console, TextColumn("[bold]epoch {task.fields[epoch]}"))


def grow_progress(console: Console = err_console) -> Progress:
    """Model i of K, its epoch and batch, losses, throughput and ETA while a set grows."""
    return _epoch_progress(console, TextColumn("[bold]model {task.fields[model]}"), TextColumn("{task.fields[epoch]}"))


def _epoch_progress(console: Console, *lead: TextColumn) -> Progress:
    """`lead` columns, then the bar, batches, losses, rate, elapsed time and ETA that training shows."""
    return _Progress(
        *lead,
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def work_progress(console: Console = err_console) -> Progress:
    """A generic bar with items/s and ETA for evaluation work."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def format_losses(event: BatchEvent) -> str:
    parts = [f"L {event.losses['total']:.3f}", f"cls {event.losses['class']:.3f}"]
    if event.losses["angle"]:
        parts.append(f"ang {event.losses['angle']:.3f}")
    if event.losses["transfer1"] or event.losses["transfer2"]:
        parts.append(f"t1 {event.losses['transfer1']:.3f} t2 {event.losses['transfer2']:.3f}")
    if "smooth" in event.losses:
        parts.append(f"sm {event.losses['smooth']:.3f}")
    return " ".join(parts)


def format_epoch(metric: EpochMetric) -> str:
    """An epoch's log line after its label: `train` and `grow` print the same fields, one line per epoch."""
    accs = " ".join(f"{a:.1f}" for a in metric.clean_acc)
    return f"loss {metric.loss_total:.4f} val {metric.val_loss:.4f} clean % {accs}"


RUNS_COLUMNS = ("run", "method", "dataset", "arch", "n", "status", "epoch", "clean %", "worst BB %", "created")
RUNS_DROPPED_FIRST = ("created", "arch", "dataset", "epoch")  # on a narrow terminal, in this order
_RIGHT = ("n", "epoch", "clean %", "worst BB %")


def runs_table(runs: Sequence[Run], worst_blackbox: dict[str, float], width: int | None = None) -> Table:
    """One line per run. When the rows do not fit in `width` columns, the least needed columns go
    (`RUNS_DROPPED_FIRST`) rather than cells folding over several lines: a row stays grep-able; then
    the rules, then the method label is cut or dropped, then clean accuracy and n (down to about 55
    columns with the longest ids; below that the terminal cuts what is left)."""
    colours = {"finished": "green", "running": "yellow", "failed": "red", "interrupted": "magenta"}
    rows = []
    for run in runs:
        clean = f"{sum(run.clean_acc) / len(run.clean_acc):.1f}" if run.clean_acc else "-"
        bb = worst_blackbox.get(run.id)
        role = run.config.get("role")  # a helper run deflect made for itself (a pool, the static adversary)
        origin = f" ({role})" if role else " (grown)" if run.config.get("parent") else ""
        rows.append({
            "run": run.id, "method": run.method + origin, "dataset": run.dataset, "arch": run.arch, "n": str(run.n),
            "status": run.status, "epoch": f"{run.epochs_done}/{run.epochs_total}", "clean %": clean,
            "worst BB %": f"{bb:.1f}" if bb is not None else "-", "created": run.created.strftime("%m-%d %H:%M"),
        })
    columns = list(RUNS_COLUMNS)
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}

    def needed(ruled: bool = True) -> int:  # cell text, a space of padding each side, and a rule
        # between columns and at the ends (`ruled`), or no rules at all
        return sum(widths[c] + (3 if ruled else 2) for c in columns) + (1 if ruled else -2)

    for col in RUNS_DROPPED_FIRST:
        if width is None or needed() <= width:
            break
        columns.remove(col)
    # ids are what users copy into every other command: when the rows still do not fit, the rules
    # go, then the method (the longest free text, "independent (static-adversary)") is cut, then
    # dropped with the clean accuracy and n; never the id, the status or the worst black-box figure
    ruled = width is None or needed() <= width
    table = Table(title="deflect runs", header_style="bold") if ruled else Table(
        title="deflect runs", header_style="bold underline", box=None, pad_edge=False)
    for col in ("method", "clean %", "n"):
        over = needed(ruled) - width if width is not None else 0
        if over <= 0:
            break
        if col == "method" and widths["method"] - over >= len("method"):
            widths["method"] -= over
        else:
            columns.remove(col)
    for col in columns:
        table.add_column(col, justify="right" if col in _RIGHT else "left", no_wrap=True,
                         overflow="ellipsis", min_width=None if col == "method" else widths[col],
                         max_width=widths[col] if col == "method" else None)
    for row in rows:
        status = row["status"]
        cells = {**row, "status": f"[{colours.get(status, 'white')}]{status}[/]"}
        table.add_row(*(cells[c] for c in columns))
    return table


def accuracy_style(value: float) -> str:
    """Cell colour by accuracy: red (attack works) → green (attack deflected)."""
    if value >= 80:
        return "bold green"
    if value >= 50:
        return "yellow"
    if value >= 20:
        return "dark_orange"
    return "bold red"


def matrix_table(title: str, matrix: Sequence[Sequence[float]], row_labels: Sequence[str],
                 col_labels: Sequence[str]) -> Table:
    """An accuracy matrix with coloured cells; diagonal (white-box) cells are underlined. Its summary
    goes on a line of its own: a caption would wrap to the width of a 2-model table."""
    table = Table(title=title, header_style="bold", min_width=len(title))  # a title folded mid-id defeats grep
    table.add_column("source \\ target")
    for label in col_labels:
        table.add_column(label, justify="right")
    for r, (label, row) in enumerate(zip(row_labels, matrix, strict=True)):
        cells = []
        for c, value in enumerate(row):
            style = accuracy_style(value) + (" underline" if r == c and len(row_labels) == len(col_labels) else "")
            cells.append(f"[{style}]{value:.1f}[/]")
        table.add_row(label, *cells)
    return table


def key_value_table(title: str, rows: Sequence[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, min_width=len(title))
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, str) else f"{value:.2f}")
    return table
