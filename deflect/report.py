"""Tables and figures from stored evaluations: Markdown/CSV/JSON and matplotlib PNGs."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deflect.store import Evaluation, Run, per_attack, settings_key


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Render to memory, then write atomically: a killed process leaves the old PNG or the new one, never half."""
    from deflect.checkpoint import atomic_write

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())


def heatmap_png(matrix: Sequence[Sequence[float]], path: Path, title: str,
                row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None) -> Path:
    """Accuracy heatmap (0-100 %), white-box diagonal outlined, value in every cell."""
    plt = _plt()
    data = np.asarray(matrix, dtype=float)
    rows, cols = data.shape
    longest = max((len(label) for label in row_labels or ()), default=2)  # "static:RUN" rows need room
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * cols + 0.07 * max(longest - 2, 0), 0.8 + 0.5 * rows))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100)
    ax.set_xticks(range(cols), col_labels or [str(i) for i in range(cols)])
    ax.set_yticks(range(rows), row_labels or [str(i) for i in range(rows)])
    ax.set_xlabel("target model")
    ax.set_ylabel("source")
    ax.set_title(title, fontsize=9)
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=7)
    if rows == cols:
        for i in range(rows):
            ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def curves_png(x: Sequence[float], series: dict[str, Sequence[float]], path: Path, title: str,
               xlabel: str, ylabel: str = "accuracy (%)", xs: dict[str, Sequence[float]] | None = None,
               integer_x: bool = False) -> Path:
    """Line plot of several series over x (ε sweeps, ensemble size); `xs` gives a series its own x
    (sets of different sizes have ensembles of different sizes)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, ys in series.items():
        ax.plot(list((xs or {}).get(label, x)), list(ys), marker="o", label=label)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def tsne_png(points: np.ndarray, owners: np.ndarray, path: Path, title: str) -> Path:
    """Gradient-sign t-SNE scatter coloured by model (paper Figures 3/4)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for k in np.unique(owners):
        sel = owners == k
        ax.scatter(points[sel, 0], points[sel, 1], s=3, label=f"model {k}")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=4, fontsize=7)
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def _fmt(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1f}" if std is None or math.isnan(std) else f"{v:.1f}±{std:.1f}"


def latest_per_attack(
    evals: Sequence[Evaluation], kind: str = "transfer", split: str = "test", *, dataset: str | None = None
) -> dict[str, Evaluation]:
    """Per attack, the evaluation on `split` (reported tables use the test split only) to put in a table:
    at the attack's own settings for `dataset` (Table 1's, as `make_attack` gives them) where one was
    stored, else at the settings it was measured with most recently; of those, the largest, the newest
    of equals. A 5-image check at another ε must not stand in for the paper's setting on 1000 images."""
    chosen = [ev for ev in evals if ev.kind == kind and ev.params.get("split", "test") == split]
    return per_attack(chosen, lambda attack: own_settings(attack, dataset))


def own_settings(attack: str, dataset: str | None, m: int | None = None) -> str | None:
    """The settings key (`settings_key`) of `attack` exactly as `make_attack(attack, dataset)` builds it
    (Table 1's, scaled), with the ensemble size `m` of an ensemble evaluation; None for an attack deflect
    does not know by that name or no dataset. Compare, the game and the reproduction all ask this one
    question of a stored evaluation: was it measured at the attack's own settings?"""
    from deflect.attacks import adaptive_attack_names, attack_names, default_params

    if dataset is None or attack not in {*attack_names(), *adaptive_attack_names()}:
        return None
    return json.dumps({**default_params(attack, dataset), **({"m": m} if m is not None else {})}, sort_keys=True)


def comparison_values(runs: Sequence[Run], evals: dict[str, dict[str, Evaluation]],
                      metric: str) -> list[dict[str, Any]]:
    """Attacks × runs as numbers, in the paper's attack order: per attack, a cell per run (in the
    order given) with its mean (and, for the black-box metric, the std over pairs), or None where
    the run has no such evaluation. A cell measured at other settings than the attack's own (an ε
    override, or CW/EAD from before they sent their last iterate) says so: `"own_settings": false`."""
    from deflect.attacks import attack_names

    order = {name: i for i, name in enumerate(attack_names())}
    attacks = sorted({a for per in evals.values() for a in per}, key=lambda a: (order.get(a, 99), a))
    values: list[dict[str, Any]] = []
    if metric == "whole-set":
        values.append({"attack": "no attack",
                       "cells": [{"mean": float(np.mean(r.clean_acc))} if r.clean_acc else None for r in runs]})
    for attack in attacks:
        cells: list[dict[str, Any] | None] = []
        for r in runs:
            ev = evals.get(r.id, {}).get(attack)
            if ev is None:
                cells.append(None)
            else:
                cell = ({"mean": ev.whole_set_mean} if metric == "whole-set"
                        else {"mean": ev.blackbox_mean, "std": ev.blackbox_std})
                own = own_settings(attack, r.dataset)
                cells.append({**cell, **({"own_settings": False} if own and settings_key(ev) != own else {})})
        values.append({"attack": attack, "cells": cells})
    return values


def comparison_rows(runs: Sequence[Run], evals: dict[str, dict[str, Evaluation]],
                    metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows of attacks × runs, laid out like the paper's Tables 2/3 (black-box) or 4 (whole set)."""
    header = ["attack", *[f"{r.method} n={r.n} ({r.id})" for r in runs]]
    rows = [[v["attack"], *[_fmt(c["mean"], c.get("std")) + ("*" if c.get("own_settings") is False else "")
                            if c else "-" for c in v["cells"]]]
            for v in comparison_values(runs, evals, metric)]
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def evaluation_dict(ev: Evaluation) -> dict[str, Any]:
    return json.loads(ev.model_dump_json())


def export_run(run: Run, evals: Sequence[Evaluation], fmt: str) -> str:
    """A run's stored evaluations as csv (one row per matrix cell), json or md."""
    if fmt == "json":
        payload = {"run": json.loads(run.model_dump_json()), "evaluations": [evaluation_dict(e) for e in evals]}
        return json.dumps(payload, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["run", "evaluation", "kind", "attack", "source", "target", "accuracy", "success_rate",
                         "eps"])
        for ev in evals:
            if ev.kind == "eps-sweep":  # one transfer matrix per ε (the stored rows are its summary)
                for eps, matrix in zip(ev.params.get("eps") or [], ev.extra.get("matrices") or [], strict=False):
                    for i, row in enumerate(matrix):
                        for j, v in enumerate(row):
                            writer.writerow([run.id, ev.id, ev.kind, ev.attack, i, j, f"{v:.4f}", "", f"{eps:g}"])
                continue
            labels = ev.extra.get("row_labels") or [str(i) for i in range(len(ev.matrix or []))]
            eps = ev.params.get("eps")
            for i, row in enumerate(ev.matrix or []):
                for j, v in enumerate(row):
                    succ = ev.success[i][j] if ev.success and i < len(ev.success) else ""
                    writer.writerow([run.id, ev.id, ev.kind, ev.attack, labels[i], j, f"{v:.4f}",
                                     f"{succ:.4f}" if succ != "" else "",
                                     f"{eps:g}" if isinstance(eps, int | float) else ""])
        return buf.getvalue()
    parts = [f"# {run.id}\n", f"{run.method}, {run.dataset}, {run.arch}, n={run.n}; "
             f"clean accuracy {', '.join(f'{a:.1f}' for a in (run.clean_acc or []))}\n"]
    for ev in evals:
        parts.append(f"\n## {ev.kind}: {ev.attack} (evaluation {ev.id}, {ev.n_examples} examples)\n\n")
        parts.append(f"parameters: `{json.dumps(ev.params, sort_keys=True)}`\n\n")
        if ev.matrix and ev.kind == "eps-sweep":  # rows: ε, black-box mean, whole-set mean
            header = ["ε", "black-box %", "whole set %"]
            parts.append(markdown_table(header, [[f"{e:g}", f"{b:.1f}", f"{w:.1f}"] for e, b, w in ev.matrix]))
        elif ev.matrix:
            labels = ev.extra.get("row_labels") or [str(i) for i in range(len(ev.matrix))]
            header = ["source \\ target", *[str(j) for j in range(len(ev.matrix[0]))]]
            rows = [[labels[i], *[f"{v:.1f}" for v in row]] for i, row in enumerate(ev.matrix)]
            parts.append(markdown_table(header, rows))
        if ev.blackbox_mean is not None:
            parts.append(f"\nblack-box {_fmt(ev.blackbox_mean, ev.blackbox_std)} · whole set "
                         f"{_fmt(ev.whole_set_mean)} · white-box {_fmt(ev.whitebox_mean)} · "
                         f"success rate {_fmt(ev.success_rate)}\n")
        for key, value in ev.extra.items():
            if key != "row_labels" and isinstance(value, int | float) and not isinstance(value, bool):
                parts.append(f"\n{key}: {value}\n" if isinstance(value, int) else f"\n{key}: {value:.2f}\n")
    return "".join(parts)
