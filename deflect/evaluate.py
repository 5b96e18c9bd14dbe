"""Transfer matrices and the paper's evaluations built on them.

`transfer_matrix` is the paper's n×n matrix of test accuracy (%) on adversarial examples, rows =
source model the attack was crafted on, columns = target model (diagonal = white-box). Each
source's examples are crafted once per batch and scored on every target in the same pass.
Accuracy is over all selected test images (not filtered to correctly classified ones, as in the
released evaluation code); the attack success rate beside it counts only images the target
classified correctly when clean, because simulations and deflection rates are phrased in successes.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from deflect.attacks import Attack, CallableAttack, make_attack
from deflect.data import ImageTensorDataset
from deflect.errors import DeflectError
from deflect.inference import bf16_crafting, eval_batch_size, inference_copy, whole_number
from deflect.runtime import fast_cpu_math
from deflect.store import EVAL_SEED

__all__ = ["PAPER_SWEEP_EPS", "EnsembleResult", "TransferResult", "ensemble_matrix", "eps_sweep",
           "gradient_signs", "gradient_tsne", "model_subsets", "neighbour_agreement", "select_subset",
           "success_percent", "sweep_eps_values", "task_seed", "transfer_matrix"]

Progress = Callable[[int, int], None]  # (done, total) units of work
PAPER_SWEEP_EPS = (0.0196, 0.031, 0.047, 0.062, 0.078, 0.094, 0.117, 0.156)  # Figure 5


@dataclass
class TransferResult:
    """An accuracy matrix (rows: sources, columns: targets) with the paper's summaries."""

    attack: str
    params: dict[str, Any]
    matrix: list[list[float]]
    success: list[list[float]]
    clean: list[float]
    n_examples: int
    seconds: float = 0.0
    row_labels: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.clean)

    def _off_diagonal(self) -> list[float]:
        return [v for i, row in enumerate(self.matrix) for j, v in enumerate(row) if i != j]

    @property
    def blackbox_mean(self) -> float:
        """Mean of the off-diagonal cells (paper Tables 2/3)."""
        off = self._off_diagonal()
        return float(np.mean(off)) if off else math.nan

    @property
    def blackbox_std(self) -> float:
        off = self._off_diagonal()
        return float(np.std(off)) if off else math.nan

    @property
    def blackbox_min(self) -> float:
        off = self._off_diagonal()
        return float(np.min(off)) if off else math.nan

    @property
    def whitebox_mean(self) -> float:
        return float(np.mean([self.matrix[i][i] for i in range(min(self.n, len(self.matrix)))]))

    @property
    def whole_set_mean(self) -> float:
        """Mean of all cells, white-box included (paper Table 4)."""
        return float(np.mean(self.matrix))

    @property
    def success_rate(self) -> float:
        """Mean off-diagonal attack success rate (%): transfers that flip a correct answer."""
        off = [v for i, row in enumerate(self.success) for j, v in enumerate(row) if i != j]
        return float(np.mean(off)) if off else math.nan

    def summary(self) -> dict[str, float]:
        return {
            "blackbox_mean": self.blackbox_mean,
            "blackbox_std": self.blackbox_std,
            "blackbox_min": self.blackbox_min,
            "whitebox_mean": self.whitebox_mean,
            "whole_set_mean": self.whole_set_mean,
            "success_rate": self.success_rate,
            "clean_mean": float(np.mean(self.clean)),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.summary()}


@dataclass
class EnsembleResult:
    """Attacks crafted on m-model subsets (logit average), scored on every model (Table 5)."""

    m: int
    attack: str
    params: dict[str, Any]
    subsets: list[tuple[int, ...]]
    matrix: list[list[float]]  # rows: subsets, columns: target models
    clean: list[float]
    n_examples: int
    seconds: float = 0.0
    # attack success (%) per subset and target: of the images the target gets right, the share flipped
    success: list[list[float]] = field(default_factory=list)

    @property
    def mean_all(self) -> float:
        """Average accuracy over all models and subsets (paper Figure 6)."""
        return float(np.mean(self.matrix))

    @property
    def mean_unowned(self) -> float | None:
        """Average accuracy on the models the attacker does not hold (None when m = n: there are none)."""
        vals = [v for s, row in zip(self.subsets, self.matrix, strict=True) for j, v in enumerate(row) if j not in s]
        return float(np.mean(vals)) if vals else None

    @property
    def mean_owned(self) -> float:
        vals = [v for s, row in zip(self.subsets, self.matrix, strict=True) for j, v in enumerate(row) if j in s]
        return float(np.mean(vals))

    def summary(self) -> dict[str, float | None]:
        return {"mean_all": self.mean_all, "mean_unowned": self.mean_unowned, "mean_owned": self.mean_owned}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["subsets"] = [list(s) for s in self.subsets]
        return {**data, **self.summary()}


def select_subset(data: ImageTensorDataset, limit: int | None, seed: int = 0) -> ImageTensorDataset:
    """A fixed, seeded subset of `limit` examples (the whole set when limit is None)."""
    if limit is None:
        return data
    idx = _subset_indices(len(data), limit, seed)
    return data if idx is None else data.subset(idx)


def _subset_indices(size: int, limit: int, seed: int) -> torch.Tensor | None:
    """The sorted indices of a seeded subset of `limit` of `size` examples; None for all of them."""
    whole = whole_number(limit)
    if whole is None or whole < 1:
        raise DeflectError(f"--limit (limit=) must be a whole number of at least 1, got {limit!r}")
    if whole >= size:
        return None
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:whole].sort().values


def examples(data: ImageTensorDataset | Dataset | Iterable, limit: int | None, seed: int
             ) -> ImageTensorDataset | Dataset | Iterable:
    """The examples an evaluation runs on: a seeded subset of `limit` of a dataset (deflect's own or
    any map-style torch `Dataset` of (image, label) items), or every batch of a loader.

    A loader yields batches already drawn, so it has no subset to take: `limit` with one is refused
    rather than read as "the first batches", which would not be the images `limit` picks elsewhere.
    """
    if isinstance(data, ImageTensorDataset):
        return select_subset(data, limit, seed)
    if _map_style(data):
        idx = None if limit is None else _subset_indices(len(data), limit, seed)  # type: ignore[arg-type]
        return data if idx is None else Subset(data, idx.tolist())  # type: ignore[arg-type]
    if limit is not None:
        raise DeflectError("limit= picks images from a dataset; pass the dataset itself, not a loader of batches")
    return data


def _map_style(data: object) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__")


def _batches(data: ImageTensorDataset | Dataset | Iterable, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches: `batch_size` at a time from a dataset, as they come from a loader."""
    if isinstance(data, ImageTensorDataset):
        return [data.batch(torch.arange(s, min(s + batch_size, len(data)))) for s in range(0, len(data), batch_size)]
    source = DataLoader(data, batch_size=batch_size) if _map_style(data) else data  # type: ignore[arg-type]
    out = []
    for item in source:
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], torch.Tensor)):
            raise DeflectError("the evaluation data must give (images, labels) pairs: a dataset of "
                               "(image tensor, label) items or a loader of (image batch, labels) batches")
        out.append((item[0], torch.as_tensor(item[1]).long().reshape(-1)))
    return out


def success_percent(flipped: np.ndarray, clean: np.ndarray) -> list:
    """Attack success (%) per target: of the images a target classifies correctly (`clean` counts,
    per target), the share the attack flipped (`flipped`, per target or per source × target)."""
    return (100.0 * flipped / np.maximum(clean, 1)).tolist()


def _prepare(models: Sequence[nn.Module], device: torch.device | str | None) -> tuple[list[nn.Module], torch.device]:
    if len(models) < 1:
        raise DeflectError("need at least one model to evaluate")
    dev = torch.device(device) if device is not None else next(models[0].parameters()).device
    return [inference_copy(m, dev) for m in models], dev


@torch.no_grad()
def _correct(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean matrix (models × batch): which model classifies which example correctly."""
    return torch.stack([m(x).argmax(1) == y for m in models])


def _resolve(attack: Attack | str | Callable, dataset: str | None, data: object) -> Attack:
    """An attack object from a name (budget for `dataset`, else for the data's own dataset), an
    `Attack`, or a plain ``fn(model, x, y) -> x_adv`` (wrapped in `CallableAttack`)."""
    if isinstance(attack, Attack):
        return attack
    if isinstance(attack, str):
        return make_attack(attack, _dataset_of(dataset, data, f"attack {attack!r}"))
    if callable(attack):
        return CallableAttack(attack, name=getattr(attack, "__name__", type(attack).__name__))
    raise DeflectError(f"attack must be a name, an Attack or a callable (model, x, y), got {type(attack).__name__}")


def _dataset_of(dataset: str | None, data: object, what: str) -> str:
    """The dataset whose budgets `what` uses: the caller's, else the one deflect's data comes from.
    Without either the budget would silently be CIFAR-10's, several times too small elsewhere."""
    if dataset is not None:
        return dataset
    if isinstance(data, ImageTensorDataset):
        return data.info.name
    raise DeflectError(f"{what} needs dataset= (its budget depends on the dataset) with data not "
                       "loaded by deflect.load_dataset")


def task_seed(seed: int, batch: int, source: int) -> int:
    """The RNG seed of one (batch, source) crafting task, from the evaluation's seed.

    Every task draws its random start from its own generator, so a result is the same whichever
    worker crafts it and in whatever order (a torchattacks call reproduces it after
    ``torch.manual_seed(task_seed(...))``).
    """
    return int(np.random.SeedSequence([seed, batch, source]).generate_state(1)[0])


def crafting_workers(device: torch.device, workers: int | None = None) -> int:
    """How many threads craft at once: on CPU one per intra-op thread (each then runs one-threaded).

    Independent attacks on separate cores scale with the cores, while a small CNN's convolutions
    stop gaining from intra-op threads after a few (on 2 cores both ways measure within 1.03-1.13×
    of each other; the gap opens with more cores). A GPU runs one stream: one task at a time.
    """
    if device.type != "cpu":
        return 1
    return max(1, torch.get_num_threads() if workers is None else int(workers))


@contextmanager
def _one_thread_each(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of `workers` threads whose torch ops each run on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # new threads take the global count on their first parallel op
    pool = ThreadPoolExecutor(workers, thread_name_prefix="deflect-craft",
                              initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool
    finally:  # on an error or Ctrl-C, queued tasks are dropped instead of crafted to the end
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)


def craft_and_score(
    sources: Sequence[Sequence[nn.Module]],
    targets: Sequence[nn.Module],
    data: ImageTensorDataset | Dataset | Iterable,
    attack: Attack,
    batch_size: int | None,
    seed: int,
    device: torch.device,
    progress: Progress | None,
    workers: int | None = None,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Core loop: per batch, craft once per source (a model or ensemble), score every target.

    Each (batch, source) pair is one task with its own RNG stream (:func:`task_seed`); on CPU the
    tasks run on :func:`crafting_workers` threads. An attack that cannot be seeded per task (see
    :meth:`Attack.seeded`) runs its tasks in order on the global RNG seeded with `seed`.
    `bf16`: craft under bf16 autocast (:func:`deflect.inference.bf16_crafting`); scoring stays float32.
    Returns (adversarial-correct counts [sources × targets], successes [sources × targets],
    clean-correct counts [targets], number of examples).
    """
    if bf16:
        sources = [[bf16_crafting(m, device) for m in src] for src in sources]
    batches = _batches(data, eval_batch_size(device, batch_size))
    seedable = attack.seeded(0, device) is not None
    n_workers = crafting_workers(device, workers) if seedable else 1

    def clean_task(b: int) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batches[b])
        return _correct(targets, x, y)

    def craft_task(b: int, s: int) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batches[b])
        src = sources[s]
        task_attack = attack.seeded(task_seed(seed, b, s), device) if seedable else attack
        return _correct(targets, task_attack(src[0] if len(src) == 1 else list(src), x, y), y)

    tasks = [(b, s) for b in range(len(batches)) for s in (None, *range(len(sources)))]
    run = lambda task: clean_task(task[0]) if task[1] is None else craft_task(*task)  # noqa: E731
    # counts stay on the device until the end: a GPU never waits for the host between attacks
    adv_correct = torch.zeros((len(sources), len(targets)), dtype=torch.int64, device=device)
    flipped = torch.zeros_like(adv_correct)
    clean_correct = torch.zeros(len(targets), dtype=torch.int64, device=device)
    total, done, count = len(batches) * len(sources), 0, 0
    with ExitStack() as stack:
        if n_workers > 1:
            results = stack.enter_context(_one_thread_each(n_workers)).map(run, tasks)
        else:
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(seed)
            results = map(run, tasks)
        clean = torch.empty(0, dtype=torch.bool)
        for (b, s), correct in zip(tasks, results, strict=True):
            if s is None:
                clean = correct
                clean_correct += clean.sum(1)
                count += len(batches[b][1])
                continue
            adv_correct[s] += correct.sum(1)
            flipped[s] += (clean & ~correct).sum(1)
            done += 1
            if progress:
                progress(done, total)
    return adv_correct.cpu().numpy(), flipped.cpu().numpy(), clean_correct.cpu().numpy(), count


@fast_cpu_math()
def transfer_matrix(
    models: Sequence[nn.Module],
    data: ImageTensorDataset | Dataset | Iterable,
    attack: Attack | str,
    *,
    dataset: str | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    bf16: bool = False,
) -> TransferResult:
    """The n×n matrix of accuracy (%) on adversarial examples crafted on each model.

    `workers`: crafting threads on CPU (default: one per torch thread, see :func:`crafting_workers`);
    the matrix does not depend on it. `bf16`: craft under bf16 autocast, recorded in the params as
    ``precision: bf16`` (float32 results carry no such key), as is a `seed` other than 0 (`EVAL_SEED`).
    """
    models, dev = _prepare(models, device)
    attack = _resolve(attack, dataset, data)
    data = examples(data, limit, seed)
    start = time.perf_counter()
    adv, flipped, clean, count = craft_and_score(
        [[m] for m in models], models, data, attack, batch_size, seed, dev, progress, workers, bf16
    )
    if count == 0:
        raise DeflectError("no examples to evaluate")
    return TransferResult(
        attack=attack.name,
        params=with_setting(attack.params(), bf16, seed),
        matrix=(100.0 * adv / count).tolist(),
        success=success_percent(flipped, clean),
        clean=(100.0 * clean / count).tolist(),
        n_examples=count,
        seconds=time.perf_counter() - start,
        row_labels=[str(i) for i in range(len(models))],
    )


def with_setting(params: dict[str, Any], bf16: bool, seed: int = 0) -> dict[str, Any]:
    """Attack params plus what else decides the figures when it is not the default: the crafting
    precision, and the seed that draws the image subset and the attack's randomness. A stored
    evaluation is reused (simulate's expected figure, reproduce's steps) only where these match."""
    return {**params, **({"precision": "bf16"} if bf16 else {}), **({EVAL_SEED: seed} if seed != 0 else {})}


def model_subsets(n: int, m: int, max_subsets: int | None = None, seed: int = 0) -> list[tuple[int, ...]]:
    """All m-of-n subsets, or a seeded sample of `max_subsets` of them."""
    if not 1 <= m <= n:
        raise DeflectError(f"--ensemble (m=) must be between 1 and the set size {n}, got {m}")
    subsets = list(itertools.combinations(range(n), m))
    if max_subsets is not None and max_subsets < len(subsets):
        if max_subsets < 1:
            raise DeflectError(f"--max-subsets (max_subsets=) must be at least 1, got {max_subsets}")
        subsets = sorted(random.Random(seed).sample(subsets, max_subsets))
    return subsets


@fast_cpu_math()
def ensemble_matrix(
    models: Sequence[nn.Module],
    data: ImageTensorDataset | Dataset | Iterable,
    attack: Attack | str,
    m: int,
    *,
    max_subsets: int | None = None,
    dataset: str | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    bf16: bool = False,
) -> EnsembleResult:
    """Attacks on the averaged logits of every m-model subset, scored on all n models."""
    models, dev = _prepare(models, device)
    attack = _resolve(attack, dataset, data)
    data = examples(data, limit, seed)
    subsets = model_subsets(len(models), m, max_subsets, seed)
    start = time.perf_counter()
    adv, flipped, clean, count = craft_and_score(
        [[models[i] for i in s] for s in subsets], models, data, attack, batch_size, seed, dev, progress, workers,
        bf16,
    )
    if count == 0:
        raise DeflectError("no examples to evaluate")
    return EnsembleResult(
        m=m, attack=attack.name, params=with_setting(attack.params(), bf16, seed), subsets=subsets,
        matrix=(100.0 * adv / count).tolist(), clean=(100.0 * clean / count).tolist(),
        n_examples=count, seconds=time.perf_counter() - start,
        success=success_percent(flipped, clean),
    )


def sweep_eps_values(dataset: str | None) -> list[float]:
    """Figure 5's ε list, scaled to the dataset's L∞ budget like every other attack."""
    from deflect.attacks import budget_for

    scale = budget_for(dataset).linf_scale
    return [round(e * scale, 4) for e in PAPER_SWEEP_EPS]


@fast_cpu_math()
def eps_sweep(
    models: Sequence[nn.Module],
    data: ImageTensorDataset | Dataset | Iterable,
    eps_values: Sequence[float] | None = None,
    *,
    steps: int = 100,
    dataset: str | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    bf16: bool = False,
) -> list[TransferResult]:
    """PGD with `steps` steps and α = 2.5ε/steps at each ε (paper Figure 5)."""
    from deflect.attacks import pgd_sweep_attack

    if eps_values is None:
        dataset = _dataset_of(dataset, data, "the default ε list")
    values = list(eps_values) if eps_values is not None else sweep_eps_values(dataset)
    models, device = _prepare(models, device)  # once for every ε, not once per ε
    results = []
    for k, eps in enumerate(values):
        if not eps > 0:
            raise DeflectError(f"sweep ε must be positive, got {eps}")
        attack = pgd_sweep_attack(eps, steps=steps, dataset=dataset)
        cb = (lambda d, t, k=k, eps=eps: progress(k * t + d, len(values) * t, eps)) if progress else None
        res = transfer_matrix(models, data, attack, batch_size=batch_size, limit=limit, seed=seed,
                              device=device, progress=cb, bf16=bf16)
        res.attack = f"pgd-sweep@{eps:g}"
        results.append(res)
    return results


@fast_cpu_math()
def gradient_signs(
    models: Sequence[nn.Module], data: ImageTensorDataset, n_images: int = 1000, seed: int = 0,
    device: torch.device | str | None = None, batch_size: int | None = None,
) -> np.ndarray:
    """sign(∇x L_i) for each model i and image: array [n_models, n_images, C·H·W]."""
    models, dev = _prepare(models, device)
    data = select_subset(data, n_images, seed)
    out = []
    for m in models:
        rows = []
        for x, y in _batches(data, eval_batch_size(dev, batch_size)):
            x = x.to(dev).requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(m(x), y.to(dev), reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
            rows.append(g.sign().flatten(1).cpu())
        out.append(torch.cat(rows).numpy())
    return np.stack(out)


def gradient_tsne(
    models: Sequence[nn.Module], data: ImageTensorDataset, n_images: int = 1000, seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE embedding of the gradient signs (paper Figures 3/4): (points [N, 2], model index [N])."""
    from sklearn.manifold import TSNE

    signs = gradient_signs(models, data, n_images, seed, device)
    n_models, n_img, dims = signs.shape
    flat = signs.reshape(n_models * n_img, dims)
    perplexity = float(min(30, max(5, (len(flat) - 1) // 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(flat)
    return emb, np.repeat(np.arange(n_models), n_img)


def neighbour_agreement(points: np.ndarray, owners: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Share of each point's k nearest neighbours that belong to the same model, and its chance level.

    The t-SNE figures show each model's gradients as several clusters (one per class or mode), so
    a centroid or silhouette score stays near 0 even when no cluster mixes models; neighbour
    agreement measures the mixing the figure shows. Chance is Σ share², 1/n for equal shares.
    """
    from sklearn.neighbors import NearestNeighbors

    owners = np.asarray(owners)
    if len(points) <= 1 or len(np.unique(owners)) < 2:
        return float("nan"), float("nan")
    k = min(k, len(points) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    same = owners[idx[:, 1:]] == owners[:, None]
    shares = np.bincount(owners) / len(owners)
    return float(same.mean()), float((shares ** 2).sum())
