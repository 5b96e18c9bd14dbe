"""Evaluations of stored runs: load the set, run the evaluation, store the result.

The CLI's `evaluate` and `demo` are thin shells over these functions; a notebook user can call
them directly with a `Store`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deflect.attacks import adaptive_attack_names, attack_names, linf_params, make_attack
from deflect.data import load_dataset
from deflect.errors import DeflectError
from deflect.evaluate import (
    EnsembleResult,
    TransferResult,
    ensemble_matrix,
    eps_sweep,
    gradient_tsne,
    neighbour_agreement,
    transfer_matrix,
    with_setting,
)
from deflect.inference import require_bf16
from deflect.report import curves_png, heatmap_png, tsne_png
from deflect.sets import load_set
from deflect.store import Evaluation, Run, Store
from deflect.train.runner import resolve_device

Progress = Callable[[int, int], None]


def split_names(spec: str, flag: str) -> list[str]:
    """A comma list of names, stripped; none for a blank one, and an error for an empty name between
    commas ("pgd2,,fgsm"), which would otherwise be lost without a word."""
    parts = [a.strip() for a in spec.split(",")]
    if not any(parts):
        return []
    if not all(parts):
        raise DeflectError(f"{flag} {spec!r} has an empty name between commas")
    return parts


def parse_attacks(spec: str | None, use_all: bool) -> list[str]:
    """`pgd1`, `pgd1,fgsm` or --all (Table 1) → attack keys; the adaptive attacks may be named too."""
    names = attack_names()
    if use_all:
        return names
    chosen = [a.lower() for a in split_names("pgd1" if spec is None else spec, "--attack")]
    known = [*names, *adaptive_attack_names()]
    if not chosen:
        raise DeflectError(f"--attack names no attack; choose from: {', '.join(known)}")
    for a in chosen:
        if a not in known:
            raise DeflectError(f"unknown attack {a!r}; choose from: {', '.join(known)}")
    repeated = sorted({a for a in chosen if chosen.count(a) > 1})
    if repeated:
        raise DeflectError(f"--attack names {', '.join(repeated)} more than once")
    return chosen


def figures_dir(store: Store, run: Run) -> Path:
    """The run's figures/ folder, refused up front when the folder is another database's."""
    return store.writable_run_dir(run) / "figures"


def store_transfer(store: Store, run: Run, res: TransferResult, kind: str = "transfer",
                   extra: dict[str, Any] | None = None, split: str = "test") -> Evaluation:
    s = res.summary()
    return store.add_evaluation(
        Evaluation(
            run_id=run.id, kind=kind, attack=res.attack, params={**res.params, "split": split},
            matrix=res.matrix,
            success=res.success, clean_acc=res.clean, blackbox_mean=s["blackbox_mean"],
            blackbox_std=s["blackbox_std"], whole_set_mean=s["whole_set_mean"],
            whitebox_mean=s["whitebox_mean"], success_rate=s["success_rate"],
            n_examples=res.n_examples, seconds=res.seconds,
            extra={**(extra or {}), "blackbox_min": s["blackbox_min"]},
        )
    )


class RunEvaluator:
    """Loads a run's models and test data once, then runs and stores evaluations on them."""

    def __init__(self, store: Store, run_ref: str, *, limit: int | None = None, batch_size: int | None = None,
                 seed: int = 0, device: str = "auto", split: str = "test", bf16: bool = False) -> None:
        self.store = store
        self.run = store.get_run(run_ref)
        self.device = resolve_device(device)
        if bf16:  # refused before the models and data load, not after
            require_bf16(self.device)
        if not self.run.epochs_done:
            raise DeflectError(f"run {self.run.id} has no saved epoch yet ({self.run.status})")
        self.figures = figures_dir(store, self.run)  # before any work: the figures of its evaluations go there
        self.models = [m.to(self.device) for m in load_set(self.run.id, store)]
        cfg = self.run.config
        self.dataset = self.run.dataset
        if split not in ("test", "val"):
            raise DeflectError(f"unknown split {split!r}; evaluate on 'test' or 'val' (for choosing settings)")
        self.split = split
        self.test = load_dataset(self.dataset, split, cfg.get("data_dir"), False)
        self.kw = dict(dataset=self.dataset, batch_size=batch_size, limit=limit, seed=seed, device=self.device,
                       bf16=bf16)

    def attack(self, name: str, **overrides: Any) -> Any:
        given = {k: v for k, v in overrides.items() if v is not None}
        takes = make_attack(name, self.dataset).params()
        if unknown := [k for k in given if k not in takes]:  # named as the flags evaluate offers
            offered = [f"--{k}" for k in ("eps", "alpha", "steps", "unfooled") if k in takes]
            raise DeflectError(f"{', '.join('--' + k for k in unknown)} does not apply to attack {name} "
                               f"(it takes {', '.join(offered) or 'none of --eps, --alpha, --steps, --unfooled'})")
        if (eps := given.get("eps")) is not None and eps > 1 and "eps" in linf_params(name):
            raise DeflectError(f"--eps {eps} is more than 1: {name}'s ε is an L∞ budget on images in [0, 1]")
        return make_attack(name, self.dataset, **given)

    def transfer(self, name: str, overrides: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> tuple[TransferResult, Evaluation]:
        res = transfer_matrix(self.models, self.test, self.attack(name, **(overrides or {})),
                              progress=progress, **self.kw)
        ev = store_transfer(self.store, self.run, res, split=self.split)
        # named by evaluation too: the same attack at another ε or on another split keeps its own figure
        heatmap_png(res.matrix, self.figures / f"transfer-{name}-{ev.id}.png",
                    f"{self.run.id}: {name} (accuracy %)")
        return res, ev

    def ensemble(self, name: str, m: int, max_subsets: int | None, overrides: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> tuple[EnsembleResult, Evaluation]:
        res = ensemble_matrix(self.models, self.test, self.attack(name, **(overrides or {})), m,
                              max_subsets=max_subsets, progress=progress, **self.kw)
        labels = [",".join(map(str, s)) for s in res.subsets]
        s = res.summary()
        ev = self.store.add_evaluation(
            Evaluation(
                run_id=self.run.id, kind="ensemble", attack=name, params={**res.params, "m": m, "split": self.split},
                matrix=res.matrix, success=res.success, clean_acc=res.clean, whole_set_mean=s["mean_all"],
                n_examples=res.n_examples, seconds=res.seconds,
                extra={"m": m, "row_labels": labels, "mean_unowned": s["mean_unowned"],
                       "mean_owned": s["mean_owned"]},
            )
        )
        heatmap_png(res.matrix, self.figures / f"ensemble-{name}-m{m}-{ev.id}.png",
                    f"{self.run.id}: {name} on {m}-model ensembles", row_labels=labels)
        return res, ev

    def sweep(self, eps_values: Sequence[float] | None, steps: int,
              progress: Callable[[int, int, float], None] | None = None) -> tuple[list[TransferResult], Evaluation]:
        results = eps_sweep(self.models, self.test, eps_values, steps=steps, progress=progress, **self.kw)
        eps = [r.params["eps"] for r in results]
        bb = [r.blackbox_mean for r in results]
        whole = [r.whole_set_mean for r in results]
        ev = self.store.add_evaluation(
            Evaluation(
                run_id=self.run.id, kind="eps-sweep", attack="pgd-sweep",
                params=with_setting({"steps": steps, "eps": eps, "split": self.split}, self.kw["bf16"],
                                    int(self.kw["seed"])),
                matrix=[[e, b, w] for e, b, w in zip(eps, bb, whole, strict=True)],
                n_examples=results[0].n_examples if results else 0,
                seconds=sum(r.seconds for r in results),
                extra={"columns": ["eps", "blackbox_mean", "whole_set_mean"],
                       "matrices": [r.matrix for r in results]},
            )
        )
        curves_png(eps, {"black-box": bb, "whole set": whole}, self.figures / f"eps-sweep-{ev.id}.png",
                   f"{self.run.id}: PGD-{steps} ε sweep", "ε (L∞)")
        return results, ev

    def tsne(self, n_images: int = 1000) -> tuple[Path, Evaluation]:
        start = time.perf_counter()
        points, owners = gradient_tsne(self.models, self.test, n_images, int(self.kw["seed"]), self.device)
        # named by its settings: the evaluation stores this path, and a t-SNE of another split, size or
        # seed must not overwrite the figure an earlier evaluation points to
        name = f"gradient-tsne-{self.split}-n{n_images}-seed{int(self.kw['seed'])}.png"
        path = tsne_png(points, owners, self.figures / name,
                        f"{self.run.id}: t-SNE of input-gradient signs ({self.split}, {n_images} images)")
        agreement, chance = neighbour_agreement(points, owners)
        centroids = np.stack([points[owners == k].mean(0) for k in np.unique(owners)])
        ev = self.store.add_evaluation(
            Evaluation(
                run_id=self.run.id, kind="tsne", attack="gradient-sign",
                params=with_setting({"n_images": n_images, "split": self.split}, False, int(self.kw["seed"])),
                n_examples=int(len(points) // max(len(centroids), 1)), seconds=time.perf_counter() - start,
                extra={"png": str(path), "separation": _separation(points, owners),
                       "neighbour_agreement": agreement, "chance": chance,
                       "centroids": centroids.tolist()},
            )
        )
        return path, ev


def _separation(points: np.ndarray, owners: np.ndarray) -> float:
    """Silhouette score of the embedding by model: near 1 = each model's gradients form its own cluster."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(owners)) < 2:
        return float("nan")
    return float(silhouette_score(points, owners))
