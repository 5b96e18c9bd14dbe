"""Data-parallel training of one set over several processes (`torchrun ... -m deflect train`).

Each process holds all n models and trains on its shard of every global batch. The disjoint
loss is not a sum of per-sample terms: BatchNorm uses batch statistics, the transfer steps use
the input gradient of the *batch-mean* loss (its scale is 1/B), and the transfer terms clamp
*after* the batch mean. Averaging shard gradients (what DistributedDataParallel does) would
therefore train a different objective. Instead, inside :func:`sharded`:

* every batch mean is :func:`batch_mean`: its value is the global mean (one all-reduce), its
  gradient the local share ``Σ_local / B_global``, so nonlinearities applied to a mean (the clamp)
  see the global value and the shards' gradients *sum* to the global one;
* BatchNorm layers (:class:`GlobalBatchNorm2d`) normalise with the global batch statistics
  through a differentiable all-reduce, whose backward is again an all-reduce, so input gradients
  and the double backward through them cross process boundaries exactly as one process would;
* after the backward, :func:`all_reduce_grads` sums the parameter gradients (one flat buffer).

DistributedDataParallel's reducer is not used: it averages, and it expects one forward per
backward, while the disjoint step runs each model up to 2n+1 times and differentiates twice.
Rank 0 alone evaluates and writes the database and the checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deflect.errors import DeflectError

_GLOBAL_BATCH: ContextVar[int | None] = ContextVar("deflect_global_batch", default=None)


@dataclass(frozen=True)
class Shard:
    """This process's place in the group: rank `rank` of `world`."""

    rank: int
    world: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
        return torch.tensor_split(x, self.world)[self.rank]


def from_env(device_kind: str) -> Shard | None:
    """Join the process group torchrun describes in the environment (None when run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        # evaluation on rank 0 between epochs can take long: the others wait at a barrier meanwhile
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
    return Shard(dist.get_rank(), dist.get_world_size())


def check_config(method: str, step: str, transfer_batch: int | None) -> None:
    """What data-parallel training supports: the joint methods on the reference step."""
    if method not in ("disjoint", "independent"):
        raise DeflectError(f"torchrun training supports --method disjoint or independent, not {method!r}")
    if step != "reference" or transfer_batch is not None:
        raise DeflectError("torchrun training runs the reference step: drop --step fast and --transfer-batch")


@contextlib.contextmanager
def sharded(global_batch: int) -> Iterator[None]:
    """Make :func:`batch_mean` and :class:`GlobalBatchNorm2d` global for one training step."""
    token = _GLOBAL_BATCH.set(global_batch)
    try:
        yield
    finally:
        _GLOBAL_BATCH.reset(token)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the group; its backward is again an all-reduce, so double backward works."""
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # its suggested replacement does not carry gradients
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


def batch_size(x: torch.Tensor) -> int:
    """The global batch's size when sharded, else `x`'s."""
    total = _GLOBAL_BATCH.get()
    return x.shape[0] if total is None else total


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the batch dimension of per-sample values; the global batch's mean when sharded."""
    total = _GLOBAL_BATCH.get()
    if total is None:
        return values.mean()
    local = values.sum() / total
    whole = local.detach().clone()
    dist.all_reduce(whole)
    return local + (whole - local.detach())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, inside :func:`sharded` and in training mode, uses the global batch's
    statistics (differentiably) and updates its running statistics with them; otherwise it is
    exactly ``nn.BatchNorm2d`` (same parameters and buffers, so checkpoints are interchangeable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _GLOBAL_BATCH.get() is not None):
            return super().forward(x)
        c = x.shape[1]
        count = x.new_tensor([x.numel() / c])
        sums = _all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:c] / n
        # two passes (not E[x²] − E[x]²): the centred sum keeps float32 variances exact enough
        var = _all_reduce(((x - mean.view(1, c, 1, 1)) ** 2).sum((0, 2, 3))) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        shape = (1, c, 1, 1)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def global_batchnorm(models: Sequence[nn.Module]) -> None:
    """Turn every BatchNorm2d of `models` into a :class:`GlobalBatchNorm2d`, in place."""
    for model in models:
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm2d


def all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum every parameter's gradient over the group, in one flat buffer."""
    for p in params:  # a parameter no term reached this step still takes part, with a zero gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cross_entropy_mean(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch-mean cross-entropy, global when sharded (every loss term's building block)."""
    if _GLOBAL_BATCH.get() is None:
        return F.cross_entropy(logits, y)
    return batch_mean(F.cross_entropy(logits, y, reduction="none"))
