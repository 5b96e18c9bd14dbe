"""`deflect reproduce`: train the paper's comparison sets, evaluate them, write a results report.

Every step is idempotent: a set is found again by its tag (stored in the run's config) and is
reused when finished or resumed when interrupted; an evaluation is skipped when one with the same
kind, attack and size is stored. So a reproduction that was stopped (Ctrl-C, a reboot) continues
where it was, and rerunning a finished one only rewrites the report.

The report lays the numbers out like the paper: clean accuracy, black-box (Tables 2/3) and
whole-set (Table 4) accuracy per attack, the m-of-n ensemble attack (Table 5), the ablations
(Table 6), the ε sweep (Figure 5) and the gradient t-SNE (Figures 3/4), with PNGs beside it.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deflect.attacks import CIFAR10_LINF_EPS, budget_for
from deflect.config import make_config, preset_dataset
from deflect.pipeline import RunEvaluator
from deflect.report import curves_png, markdown_table
from deflect.store import Evaluation, Run, Store
from deflect.train import Callbacks, train

TAG_KEY = "reproduce"
ATTACKS = ("fgsm", "pgd2", "mifgsm1", "cw2", "ead1")  # FGSM, PGD-20, MI-FGSM, CW κ=40, EAD at the preset ε
Say = Callable[[str], None]


@dataclass(frozen=True)
class SetSpec:
    """One set of the reproduction: its label in the report and how to train it."""

    label: str
    n: int
    method: str = "disjoint"
    overrides: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False


@dataclass(frozen=True)
class Plan:
    preset: str
    dataset: str
    quick: bool
    sets: tuple[SetSpec, ...]
    attacks: tuple[str, ...]
    limit: int  # test images per evaluation
    train_limit: int | None
    epochs: int | None
    sweep_steps: int
    tsne_images: int

    @property
    def name(self) -> str:
        return f"{self.dataset}{'-quick' if self.quick else ''}"


def make_plan(preset: str, quick: bool = False) -> Plan:
    """The sets and evaluations of a reproduction; `quick` is the issue's quick check (n=3, 20k images, 3 epochs)."""
    dataset = preset_dataset(preset)
    sets = [SetSpec("independent n=3", 3, "independent"), SetSpec("disjoint n=3", 3)]
    if not quick:
        sets += [SetSpec("disjoint n=5", 5), SetSpec("disjoint n=8", 8)]
    sets += [SetSpec("fast-at n=3", 3, "fast-at"), SetSpec("adp n=3", 3, "adp")]
    sets += [SetSpec("disjoint n=3, no angle", 3, overrides={"w_angle": 0.0}, ablation=True),
             SetSpec("disjoint n=3, no transfer", 3, overrides={"w_transfer1": 0.0, "w_transfer2": 0.0},
                     ablation=True)]
    if not quick:
        sets += [SetSpec("disjoint n=3, transfer 1 only", 3, overrides={"w_transfer2": 0.0}, ablation=True),
                 SetSpec("disjoint n=3, transfer 2 only", 3, overrides={"w_transfer1": 0.0}, ablation=True),
                 SetSpec("disjoint n=5, all pairs", 5, overrides={"sample_models": 5}, ablation=True)]
    return Plan(
        preset=preset, dataset=dataset, quick=quick, sets=tuple(sets),
        attacks=("pgd2", "mifgsm1") if quick else ATTACKS, limit=500 if quick else 1000,
        train_limit=20000 if quick and preset != "digits" else None, epochs=3 if quick else None,
        sweep_steps=20 if quick else 100, tsne_images=300 if quick else 1000,
    )


def _tag(plan: Plan, spec: SetSpec) -> str:
    return f"{plan.preset}{'/quick' if plan.quick else ''}/{spec.label}"


def find_run(store: Store, tag: str) -> Run | None:
    runs = [r for r in store.list_runs() if (r.config or {}).get(TAG_KEY) == tag]
    finished = [r for r in runs if r.status == "finished"]
    return (finished or runs or [None])[-1]


def train_set(store: Store, plan: Plan, spec: SetSpec, device: str, data_dir: str | None,
              callbacks: Callbacks | None = None, say: Say | None = None) -> Run:
    """The set's finished run: reused, resumed, or trained now."""
    tag = _tag(plan, spec)
    found = find_run(store, tag)
    if found is not None and found.status == "finished":
        return found
    user = callbacks or Callbacks()

    def on_start(run: Run, first_epoch: int) -> None:
        if (run.config or {}).get(TAG_KEY) != tag:
            store.update_run(run.id, config={**run.config, TAG_KEY: tag})
        if user.on_start:
            user.on_start(run, first_epoch)

    cbs = Callbacks(on_start=on_start, on_batch=user.on_batch, on_epoch=user.on_epoch)
    if found is not None and found.epochs_done and found.status != "running":
        if say:
            say(f"{spec.label}: resuming {found.id} after epoch {found.epochs_done}")
        return store.get_run(train(None, store, cbs, resume=found.id))
    cfg = make_config(spec.n, plan.dataset, plan.preset, method=spec.method, epochs=plan.epochs,
                      train_limit=plan.train_limit, device=device, data_dir=data_dir, **spec.overrides)
    if say:
        say(f"{spec.label}: training ({cfg.epochs} epochs)")
    return store.get_run(train(cfg, store, cbs))


def _has(store: Store, run: Run, kind: str, attack: str, n_examples: int, m: int | None = None) -> Evaluation | None:
    for ev in reversed(store.evaluations(run.id, kind)):
        if ev.attack == attack and ev.params.get("split", "test") == "test" and (
                m is None or (ev.extra or {}).get("m") == m) and (kind in ("eps-sweep", "tsne") or ev.n_examples
                                                                   == n_examples):
            return ev
    return None


def evaluate_set(store: Store, plan: Plan, spec: SetSpec, run: Run, device: str, say: Say | None = None) -> None:
    """The plan's evaluations of one set, skipping those already stored."""
    ev = RunEvaluator(store, run.id, limit=plan.limit, device=device)
    count = min(plan.limit, len(ev.test))
    attacks = plan.attacks[:1] if spec.ablation else plan.attacks
    for attack in attacks:
        if not _has(store, run, "transfer", attack, count):
            if say:
                say(f"{spec.label}: {attack} transfer matrix")
            ev.transfer(attack)
    if spec.ablation:
        return
    for m in range(2, run.n):
        if not _has(store, run, "ensemble", "pgd2", count, m):
            if say:
                say(f"{spec.label}: pgd2 on every {m}-model ensemble")
            ev.ensemble("pgd2", m, max_subsets=None if run.n <= 5 else 8)
    if not _has(store, run, "eps-sweep", "pgd-sweep", count):
        eps = CIFAR10_LINF_EPS * budget_for(plan.dataset).linf_scale
        if say:
            say(f"{spec.label}: ε sweep to {2 * eps:g}")
        ev.sweep([round(eps * f, 5) for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)], plan.sweep_steps)
    if spec.method in ("disjoint", "independent") and run.n == 3 and not _has(store, run, "tsne", "gradient-sign", 0):
        if say:
            say(f"{spec.label}: gradient t-SNE")
        ev.tsne(plan.tsne_images)


def reproduce(store: Store, preset: str, *, quick: bool = False, out: Path = Path("results"), device: str = "auto",
              data_dir: str | None = None, callbacks: Callbacks | None = None, say: Say | None = None,
              plan: Plan | None = None) -> Path:
    """Train and evaluate every set of the plan (resuming), then write `out/<dataset>.md` and its figures.

    `plan` replaces `make_plan(preset, quick)` (a notebook user's own selection of sets)."""
    plan = plan or make_plan(preset, quick)
    start = time.perf_counter()
    runs: dict[str, Run] = {}
    for spec in plan.sets:
        runs[spec.label] = train_set(store, plan, spec, device, data_dir, callbacks, say)
        evaluate_set(store, plan, spec, runs[spec.label], device, say)
    return write_report(store, plan, runs, out, time.perf_counter() - start)


# the report -----------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    return markdown_table(header, rows).rstrip("\n")


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f} ± {std:.1f}" if std is not None else f"{v:.1f}"


def _newest(store: Store, run: Run, kind: str) -> dict[str, Evaluation]:
    out: dict[str, Evaluation] = {}
    for ev in store.evaluations(run.id, kind):
        if ev.params.get("split", "test") == "test":
            key = ev.attack if kind != "ensemble" else f"{ev.attack}/m{(ev.extra or {}).get('m')}"
            out[key] = ev
    return out


def report_text(store: Store, plan: Plan, runs: dict[str, Run], seconds: float) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the data behind its figures."""
    figures: dict[str, Path] = {}
    main = [s for s in plan.sets if not s.ablation]
    ablations = [s for s in plan.sets if s.ablation]
    transfer = {label: _newest(store, run, "transfer") for label, run in runs.items()}
    train_min = sum(run.seconds for run in runs.values()) / 60
    eval_min = sum(ev.seconds for run in runs.values() for ev in store.evaluations(run.id)) / 60
    lines = [
        f"# {plan.dataset}: a measured reproduction{' (quick)' if plan.quick else ''}",
        "",
        f"Command: `deflect reproduce --preset {plan.preset}{' --quick' if plan.quick else ''}`. Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
        f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ', CPU only'}. "
        f"Compute behind the numbers: training {train_min:.1f} min, evaluation {eval_min:.1f} min "
        f"(this invocation: {seconds / 60:.1f} min; steps already stored are not redone). "
        f"Every evaluation is on a seeded subset of {plan.limit} test images; numbers are what was measured.",
        "",
        "## Sets and clean accuracy",
        "",
    ]
    rows = []
    for spec in plan.sets:
        run = runs[spec.label]
        clean = run.clean_acc or []
        rows.append([spec.label, run.id, str(run.epochs_done), " / ".join(f"{v:.1f}" for v in clean),
                     _pct(float(np.mean(clean)) if clean else None), f"{run.seconds / 60:.1f}"])
    lines += [_table(["set", "run", "epochs", "clean % per model", "mean", "train min"], rows), ""]

    for title, metric in (("Black-box accuracy (%, mean ± std over source → target pairs; Tables 2/3)", "bb"),
                          ("Whole-set accuracy (%, every model on every source's examples; Table 4)", "whole")):
        lines += [f"## {title}", ""]
        header = ["attack", *[s.label for s in main]]
        rows = []
        for attack in plan.attacks:
            cells = [attack]
            for spec in main:
                ev = transfer[spec.label].get(attack)
                cells.append("-" if ev is None else _pct(ev.blackbox_mean, ev.blackbox_std) if metric == "bb"
                             else _pct(ev.whole_set_mean))
            rows.append(cells)
        lines += [_table(header, rows), ""]

    lines += ["## Ensemble attack: PGD-20 on m of the n models (Table 5)", "",
              "Accuracy (%) of the models outside the attacker's ensemble, mean over the subsets evaluated.", ""]
    rows = []
    sizes = range(2, max(runs[s.label].n for s in main))
    for spec in main:
        ens = _newest(store, runs[spec.label], "ensemble")
        cells = [spec.label]
        for m in sizes:
            ev = ens.get(f"pgd2/m{m}")
            cells.append(_pct((ev.extra or {}).get("mean_unowned")) if ev else "-")
        rows.append(cells)
    lines += [_table(["set", *[f"m={m}" for m in sizes]], rows), ""]

    if ablations:
        lines += ["## Ablations (Table 6): PGD-20 black-box accuracy", ""]
        first = plan.attacks[0]
        base = transfer.get("disjoint n=3", {}).get(first)
        rows = [["disjoint n=3 (all terms)", _pct(base.blackbox_mean, base.blackbox_std) if base else "-",
                 _pct(float(np.mean(runs['disjoint n=3'].clean_acc or [0])))]]
        for spec in ablations:
            ev = transfer[spec.label].get(first)
            rows.append([spec.label, _pct(ev.blackbox_mean, ev.blackbox_std) if ev else "-",
                         _pct(float(np.mean(runs[spec.label].clean_acc or [0])))])
        lines += [_table(["set", f"{first} black-box %", "clean %"], rows), ""]

    sweeps: dict[str, tuple[list[float], list[float]]] = {}
    lines += ["## ε sweep (Figure 5): PGD black-box accuracy (%)", ""]
    eps_header: list[float] = []
    rows = []
    for spec in main:
        sweep = _newest(store, runs[spec.label], "eps-sweep").get("pgd-sweep")
        if sweep and sweep.matrix:
            eps = [r[0] for r in sweep.matrix]
            bb = [r[1] for r in sweep.matrix]
            sweeps[spec.label] = (eps, bb)
            eps_header = eps_header or eps
            rows.append([spec.label, *[_pct(v) for v in bb]])
    if rows:
        lines += [_table(["set", *[f"ε={e:g}" for e in eps_header]], rows), "",
                  f"![ε sweep]({plan.name}-eps-sweep.png)", ""]
    tsne = []
    for spec in main:
        ev = _newest(store, runs[spec.label], "tsne").get("gradient-sign")
        if ev:
            png = Path((ev.extra or {}).get("png", ""))
            name = f"{plan.name}-tsne-{spec.method}-n{spec.n}.png"
            figures[name] = png
            tsne.append([spec.label, f"{(ev.extra or {}).get('separation', float('nan')):.2f}", f"![t-SNE]({name})"])
    if tsne:
        lines += ["## Gradient t-SNE (Figures 3/4)", "",
                  "Separation: mean distance between the models' centroids over the mean spread within a model "
                  "(larger: the models' input gradients are more distinct).", "",
                  _table(["set", "separation", "figure"], tsne), ""]
    return "\n".join(lines), {"sweeps": sweeps, "figures": figures}


def write_report(store: Store, plan: Plan, runs: dict[str, Run], out: Path, seconds: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    text, data = report_text(store, plan, runs, seconds)
    if data["sweeps"]:
        eps = next(iter(data["sweeps"].values()))[0]
        curves_png(eps, {k: v[1] for k, v in data["sweeps"].items() if v[0] == eps},
                   out / f"{plan.name}-eps-sweep.png", f"{plan.dataset}: PGD black-box accuracy vs ε", "ε (L∞)")
    for name, source in data["figures"].items():
        if source.is_file():
            shutil.copyfile(source, out / name)
    path = out / f"{plan.name}.md"
    path.write_text(text + "\n")
    return path

