"""The adaptive attacker's own models: a surrogate stolen through queries, and a set trained like the defender's.

Random deployment assumes the attacker must transfer from models it holds. Two ways to hold better
ones without buying any: (1) query one deployed client for labels on natural images and train a
surrogate that imitates it (hard labels only, within a query budget); (2) knowing deflect's training
method, train an own set the same way (same recipe and data, another seed) and attack its ensemble.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deflect.config import TrainConfig
from deflect.data import ImageTensorDataset, dataset_info
from deflect.errors import DeflectError
from deflect.helper_runs import helper_run
from deflect.models import build_model
from deflect.runtime import training_layout
from deflect.sets import load_set
from deflect.store import Run, Store
from deflect.train import Callbacks

AWARE_ROLE = "method-aware-adversary"
AWARE_SEED = 2000  # the method-aware attacker's set: the defender's recipe with this seed added
Progress = Callable[[int, int], None]


class QueryBudget:
    """Queries spent on a deployed client; refuses (DeflectError) any query beyond the budget."""

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise DeflectError(f"query budget must be at least 1, got {budget}")
        self.budget = int(budget)
        self.used = 0

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def spend(self, count: int) -> None:
        if count > self.remaining:
            raise DeflectError(f"{count} more queries would exceed the budget of {self.budget} ({self.used} used)")
        self.used += count


class LabelOracle:
    """One deployed client seen from outside: it answers top-1 labels only, one query per image."""

    def __init__(self, model: nn.Module, budget: QueryBudget, batch_size: int = 256) -> None:
        self.model, self.budget, self.batch_size = model, budget, batch_size

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.budget.spend(len(x))
        self.model.eval()
        return torch.cat([self.model(x[i:i + self.batch_size]).argmax(1) for i in range(0, len(x), self.batch_size)])


def steal_labels(oracle: LabelOracle, pool: ImageTensorDataset, seed: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Label a seeded sample of `pool` (as many images as the budget allows, each queried once).

    The pool's own labels are never read: the surrogate learns what the client answers.
    """
    count = min(oracle.budget.remaining, len(pool))
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    x, _ = pool.batch(idx)
    x = x.to(device)
    return x, oracle(x)


def train_surrogate(x: torch.Tensor, labels: torch.Tensor, recipe: TrainConfig, *, epochs: int = 30,
                    batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                    progress: Progress | None = None) -> nn.Module:
    """A plain (independent, cross-entropy) model of the defender's architecture on stolen labels.

    Adam with a cosine-decayed learning rate: a short, robust loop for a few thousand images.
    """
    if epochs < 1:
        raise DeflectError(f"surrogate epochs must be at least 1, got {epochs}")
    info = dataset_info(recipe.dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(recipe.arch, info, recipe.normalize, recipe.width).to(x.device)
    (model,) = training_layout([model], x.device)  # channels-last on CPU, as every training model
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    batches = max(1, len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * batches)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for b in range(batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(epoch + 1, epochs)
    return model.eval()


def aware_config(run: Run, epochs: int | None = None, device: str = "auto") -> TrainConfig:
    """The defender's recipe (method, data, architecture, losses) with the attacker's own seed."""
    base = TrainConfig.from_dict(run.config)
    return dataclasses.replace(base, seed=base.seed + AWARE_SEED, device=device,
                               epochs=base.epochs if epochs is None else epochs)


def method_aware_set(store: Store, run: Run, epochs: int | None = None, device: str = "auto",
                     callbacks: Callbacks | None = None) -> tuple[list[nn.Module], Run, bool]:
    """The method-aware attacker's own set: (models, its helper run, trained now?).

    Trained once per recipe and kept as a helper run (listed, never 'latest'), like the static
    adversary's model, because on Fashion-MNIST it costs as much as the defender's training.
    """
    cfg = aware_config(run, epochs, device)
    cfg.validate()
    message = f"method-aware attacker's own set for {run.id} (deflect evaluate --adaptive)"
    helper, trained = helper_run(store, cfg, AWARE_ROLE, message, callbacks)
    return load_set(helper.id, store), helper, trained
