"""One epoch of joint training of a set, and the per-epoch measurements.

All randomness of an epoch (batch order, augmentation, which models are sampled for the
transfer terms) comes from a generator seeded by (seed, epoch), so a run resumed from the end of
epoch e replays epoch e+1 exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deflect.config import TrainConfig
from deflect.data import ImageTensorDataset
from deflect.errors import DeflectError
from deflect.runtime import changes_layout
from deflect.train.distill import Teacher, distilled
from deflect.train.distributed import Shard, all_reduce_grads, sharded
from deflect.train.losses import ActiveTerms, LossParts, disjoint_loss

LOSS_KEYS = ("total", "class", "angle", "transfer1", "transfer2")


@dataclass
class BatchEvent:
    """What a progress display needs after each batch."""

    epoch: int
    epochs: int
    batch: int
    batches: int
    images_per_s: float
    losses: dict[str, float]


@dataclass
class EpochStats:
    losses: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_KEYS, 0.0))
    seconds: float = 0.0
    lr: float = 0.0


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked, on CUDA or a CPU with native bf16 (others are refused by
    `deflect.inference.require_bf16` before training starts); never fp16, which would wreck tanh(2e4·g)."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip (CIFAR-10 recipe)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (b,), generator=gen)
    dy = torch.randint(0, 9, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(x.device)
    batch_idx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan_idx = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    out = padded[batch_idx, chan_idx, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
    return torch.where(flip.to(x.device).view(b, 1, 1, 1), out.flip(-1), out)


def train_epoch(
    models: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: ImageTensorDataset,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    on_batch: Callable[[BatchEvent], None] | None = None,
    frozen: Sequence[int] = (),
    shard: Shard | None = None,
    teacher: Teacher | None = None,
) -> EpochStats:
    """Train every model of the set for one epoch on its method's loss (Eq. 5 for disjoint sets).

    `frozen` models (fast-AT models stopped early) get no gradient and so no update; a `teacher`
    supplies soft targets for part of the classification term (`deflect.train.distill`)."""
    gen = epoch_generator(cfg.seed, epoch)
    active = ActiveTerms.for_epoch(cfg, epoch)
    k = cfg.pair_sample_size()
    for m in models:
        m.train()

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        sample = torch.randperm(len(models), generator=gen)[:k].sort().values.tolist()
        return method_loss(models, x, y, cfg, active, sample, device, gen, frozen, teacher)

    return run_epoch(batch_loss, optimizer, scheduler, data, cfg, epoch, gen, device, on_batch, shard)


BatchLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def run_epoch(
    batch_loss: BatchLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: ImageTensorDataset,
    cfg: TrainConfig,
    epoch: int,
    gen: torch.Generator,
    device: torch.device,
    on_batch: Callable[[BatchEvent], None] | None = None,
    shard: Shard | None = None,
) -> EpochStats:
    """The loop every trainer shares: seeded batch order, augmentation, one SGD step per batch on
    `batch_loss(x, y)` (which may draw more from `gen`), per-batch LR schedule, mean loss terms.

    With a `shard` (torchrun), every process draws the same global batch and computes the loss on
    its slice inside `sharded` (global means and BatchNorm statistics); gradients are then summed."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    order = torch.randperm(len(data), generator=gen)
    batches = len(order) // cfg.batch_size  # drop the ragged last batch (BN needs >1 sample)
    stats = EpochStats()
    start = time.perf_counter()
    for b in range(batches):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x, y = data.batch(idx)
        if cfg.augment:
            x = augment(x, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if shard is None:
            with autocast(device, cfg.bf16):
                total, values = batch_loss(x, y)
        else:
            with autocast(device, cfg.bf16), sharded(len(y)):
                total, values = batch_loss(shard.split(x), shard.split(y))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if shard is not None:
            all_reduce_grads(params)
        optimizer.step()
        stats.lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        values = {**dict.fromkeys(LOSS_KEYS, 0.0), **values}
        for key, value in values.items():
            stats.losses[key] = stats.losses.get(key, 0.0) + value / batches
        if on_batch is not None:
            elapsed = time.perf_counter() - start
            on_batch(
                BatchEvent(epoch, cfg.epochs, b + 1, batches, (b + 1) * len(idx) / max(elapsed, 1e-9), values)
            )
    stats.seconds = time.perf_counter() - start
    if not math.isfinite(stats.losses.get("total", 0.0)):  # SQLite would store NaN as NULL: say what happened
        raise DeflectError(f"training diverged: the mean loss of epoch {epoch} is {stats.losses['total']}; "
                           "the epoch is not saved (a lower --lr may help)")
    return stats


def method_loss(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, active: ActiveTerms,
    sample: Sequence[int], device: torch.device, gen: torch.Generator, frozen: Sequence[int] = (),
    teacher: Teacher | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch loss of the run's method and its terms by name."""
    if cfg.method == "fast-at":
        from deflect.train.baselines import dataset_eps, fast_at_loss

        return fast_at_loss(models, x, y, cfg.at_eps or dataset_eps(cfg.dataset), gen, frozen)
    if cfg.method == "adp":
        from deflect.train.baselines import adp_loss

        return adp_loss(models, x, y, cfg.adp_alpha, cfg.adp_beta)
    parts: LossParts = step_loss(models, x, y, cfg, active, sample, device)
    return distilled(parts, models, x, teacher, cfg)


def step_loss(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, active: ActiveTerms,
    sample: Sequence[int], device: torch.device,
) -> LossParts:
    """The configured step: the per-pair reference, or the fast layout (batched forwards on CUDA,
    channels-last inputs on CPU) of the same objective."""
    if cfg.step == "reference" and cfg.transfer_batch is None:
        return disjoint_loss(models, x, y, cfg, active, sample)
    from deflect.train.fast import fast_disjoint_loss

    fast = cfg.step == "fast"
    if fast and changes_layout(device):  # the inputs in the layout `training_layout` gave the models
        x = x.contiguous(memory_format=torch.channels_last)
    return fast_disjoint_loss(models, x, y, cfg, active, sample, batched=fast and device.type == "cuda")


@torch.no_grad()
def clean_accuracy(
    models: Sequence[nn.Module], data: ImageTensorDataset, device: torch.device, batch_size: int = 512
) -> list[float]:
    """Clean accuracy (%) of each model, in eval mode."""
    correct = [0] * len(models)
    for m in models:
        m.eval()
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x, y = data.batch(idx)
        x, y = x.to(device), y.to(device)
        for i, m in enumerate(models):
            correct[i] += int((m(x).argmax(1) == y).sum())
    return [100.0 * c / max(len(data), 1) for c in correct]


def validation_loss(
    models: Sequence[nn.Module], data: ImageTensorDataset, cfg: TrainConfig, device: torch.device, batch_size: int
) -> float:
    """Eq. 5 on the validation split in eval mode, with every configured term on.

    The released code keeps the checkpoint of lowest validation total loss; using all terms
    every epoch (rather than that epoch's schedule) keeps the numbers comparable across epochs.
    Only the value is needed, so no forward keeps its activations: with the graph of every pair's
    forward kept until the total, 8 width-32 models at batch 256 needed over 20 GB.
    """
    active = ActiveTerms.all_enabled(cfg)
    for m in models:
        m.eval()
    return mean_objective(data, device, batch_size,
                          lambda x, y: disjoint_loss(models, x, y, cfg, active, create_graph=False))


def mean_objective(data: ImageTensorDataset, device: torch.device, batch_size: int,
                   objective: Callable[[torch.Tensor, torch.Tensor], LossParts]) -> float:
    """The image-weighted mean of `objective(x, y).total` over `data` in order, under `no_grad` (the
    objectives take input gradients themselves). A last batch of a single image is left out."""
    total, count = 0.0, 0
    for start in range(0, len(data) - 1, batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x, y = data.batch(idx)
        with torch.no_grad():
            parts = objective(x.to(device), y.to(device))
        total += float(parts.total.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)
