"""What the dashboard shows, read from the database in worker threads (plain data, no widgets)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deflect.store import Evaluation, Run, Store


def mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class RunRow:
    """One line of the runs table."""

    id: str
    method: str
    dataset: str
    arch: str
    n: int
    status: str
    epochs_done: int
    epochs_total: int
    clean: float | None  # mean clean accuracy (%): the best epoch's when finished, else the latest epoch's
    worst_blackbox: float | None  # lowest black-box mean accuracy over attacks (`Store.worst_blackbox`)


@dataclass
class RunDetail:
    """The highlighted run: mean clean accuracy per epoch and its latest losses."""

    run_id: str
    curve: list[float] = field(default_factory=list)
    epoch: int | None = None
    losses: dict[str, float] = field(default_factory=dict)


def load_runs(store: Store) -> list[RunRow]:
    runs = store.runs_readonly()
    latest = store.latest_epochs([r.id for r in runs])
    worst = store.worst_blackbox()
    rows = []
    for run in runs:
        clean = mean(run.clean_acc) if run.clean_acc else None
        if clean is None and run.id in latest:
            clean = mean(latest[run.id].clean_acc)
        rows.append(RunRow(run.id, run.method, run.dataset, run.arch, run.n, run.status, run.epochs_done,
                           run.epochs_total, clean, worst[run.id].accuracy if run.id in worst else None))
    return rows


def load_detail(store: Store, run_id: str) -> RunDetail:
    epochs = store.epochs(run_id)
    detail = RunDetail(run_id, [m for m in (mean(e.clean_acc) for e in epochs) if m is not None])
    if epochs:
        last = epochs[-1]
        detail.epoch = last.epoch
        detail.losses = {"total": last.loss_total, "class": last.loss_class, "angle": last.loss_angle,
                         "t1": last.loss_transfer1, "t2": last.loss_transfer2, "val": last.val_loss}
    return detail


@dataclass
class MatrixData:
    """A run and the newest transfer evaluation of each attack stored for it."""

    run: Run | None
    evaluations: dict[str, Evaluation]


def load_matrix(store: Store, run_id: str) -> MatrixData:
    return MatrixData(store.run_readonly(run_id), store.newest_transfer(run_id))
