"""A faster disjoint step: the same objective as the per-pair reference, laid out for throughput.

Where the time goes (torch.profiler on the small CNN, n=3, batch 128, 2-core CPU): the double
backward through the input gradients and the 2·(n-1) perturbed forwards per model, each one a
separate small batch. This step changes the layout, not the maths:

- `batched=True` sends all perturbed inputs of model i (both transfer terms, every partner j) through
  the model in ONE forward. BatchNorm then computes statistics per chunk (the chunks are folded into
  the channel dimension), and the running statistics receive the same sequence of updates as the
  reference's separate forwards, so loss, gradients and buffers match the reference. It pays off on
  a GPU (fewer, larger kernels); on a 2-core CPU it is slower, so `auto` enables it only on CUDA.
- On CPU its inputs are made channels-last (`step_loss`), as every training model is there
  (`deflect.runtime.training_layout`): oneDNN's convolutions and max-pooling prefer NHWC.

`transfer_batch` is the one option that changes the objective: the pair terms (angle and transfer) use
only the first `transfer_batch` images of each batch, through their own forward, while
classification keeps the whole batch (as `deflect grow` does). The input gradients with their graph,
and so the double backward, then cover those images alone: that is where the step's time goes
(BatchNorm's double backward alone was 45 % of a width-32 step when the gradients were taken on the
whole batch and sliced). It is off (None) unless asked for, and never set by a paper-* preset.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deflect.config import TrainConfig
from deflect.train.distributed import batch_size
from deflect.train.losses import (
    ActiveTerms,
    LossParts,
    clamped_increase,
    clamps,
    clean_terms,
    pair_rows,
    plain_loss,
    running_stats_kept,
    transfer1_delta,
    transfer2_delta,
    with_smoothness,
)


def _chunked_bn_forward(bn: nn.BatchNorm2d, chunks: int, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over `chunks` stacked batches, each normalised by its own statistics."""
    b, c = x.shape[0] // chunks, x.shape[1]
    rest = x.shape[2:]
    folded = x.reshape(chunks, b, c, *rest).transpose(0, 1).reshape(b, chunks * c, *rest)
    track = bn.training and bn.track_running_stats and bn.running_mean is not None
    if not bn.training and bn.running_mean is not None:  # eval: one set of statistics for all chunks
        return bn._orig_forward(x)  # type: ignore[operator]
    m = bn.momentum if bn.momentum is not None else 0.1
    rm = bn.running_mean.repeat(chunks) if track else None  # type: ignore[union-attr]
    rv = bn.running_var.repeat(chunks) if track else None  # type: ignore[union-attr]
    weight = bn.weight.repeat(chunks) if bn.weight is not None else None
    bias = bn.bias.repeat(chunks) if bn.bias is not None else None
    out = F.batch_norm(folded, rm, rv, weight, bias, True, m, bn.eps)
    if track:
        assert rm is not None and rv is not None
        with torch.no_grad():
            # each chunk's copy received r' = (1-m)·r + m·stat; recover stat, then apply the
            # updates one after another as separate forwards would (.data: no version bump, like
            # the in-kernel update of an ordinary forward)
            mean = (rm - (1 - m) * bn.running_mean.repeat(chunks)) / m  # type: ignore[union-attr]
            var = (rv - (1 - m) * bn.running_var.repeat(chunks)) / m  # type: ignore[union-attr]
            for k in range(chunks):
                bn.running_mean.data.mul_(1 - m).add_(m * mean[k * c:(k + 1) * c])  # type: ignore[union-attr]
                bn.running_var.data.mul_(1 - m).add_(m * var[k * c:(k + 1) * c])  # type: ignore[union-attr]
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.data.add_(chunks)
    return out.reshape(b, chunks, c, *rest).transpose(0, 1).reshape(chunks * b, c, *rest)


@contextlib.contextmanager
def chunked_batchnorm(model: nn.Module, chunks: int) -> Iterator[None]:
    """Within the block, every BatchNorm2d of `model` treats its input as `chunks` separate batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if chunks == 1 or not bns:
        yield
        return
    for bn in bns:
        bn._orig_forward = bn.forward  # type: ignore[assignment]
        bn.forward = lambda x, bn=bn: _chunked_bn_forward(bn, chunks, x)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for bn in bns:
            bn.forward = bn._orig_forward  # type: ignore[method-assign]
            del bn._orig_forward


def perturbed_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, deltas: Sequence[torch.Tensor], per_image: bool,
    keep_stats: bool = False, batched: bool = False,
) -> list[torch.Tensor]:
    """A training-mode model's losses (per image, or their batch mean) at x + δ for each δ, in order.

    `batched` stacks the perturbed batches into one forward with BatchNorm per chunk, which gives the
    values, gradients and running statistics of one forward per δ; `keep_stats` keeps the running
    statistics out (`TrainConfig.clean_bn_stats`)."""
    if batched:
        stacked = (x.unsqueeze(0) + torch.stack(list(deltas))).flatten(0, 1)
        with chunked_batchnorm(model, len(deltas)), running_stats_kept(model, keep_stats):
            logits = model(stacked)
        rows = F.cross_entropy(logits, y.repeat(len(deltas)), reduction="none").view(len(deltas), len(y))
        return list((rows if per_image else rows.mean(1)).unbind(0))
    with running_stats_kept(model, keep_stats):
        return [plain_loss(model(x + d), y, per_image) for d in deltas]


def fast_disjoint_loss(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    active: ActiveTerms,
    sample: Sequence[int] | None = None,
    batched: bool = False,
) -> LossParts:
    """Eq. 5 exactly as `disjoint_loss` computes it (up to float rounding), faster (see module doc)."""
    n = len(models)
    sample = list(range(n)) if sample is None else list(sample)
    zero = x.new_zeros(())
    transfer = active.transfer1 or active.transfer2
    m = pair_rows(cfg, len(x)) if active.any else len(x)
    xt, yt = x[:m], y[:m]
    if m == len(x):
        losses, grads, classification, angle = clean_terms(models, x, y, cfg, active, sample)
    else:
        # `transfer_batch` (objective-changing), as `deflect grow` does it: classification on the whole
        # batch, every pair term on the first m images through their own forward, so the double
        # backward covers m images, not B. The gradients are rescaled by m/B to the whole-batch
        # mean's per-image size that ε1 and the tanh scale are set for.
        _, _, classification, _ = clean_terms(models, x, y, cfg, ActiveTerms(), sample)  # plain forwards
        losses, grads, _, angle = clean_terms(models, xt, yt, cfg, active, sample)
        grads = [None if g is None else g * (m / len(x)) for g in grads]
    scale = x.shape[0] if cfg.eps1_per_sample else 1.0
    t1: dict[tuple[int, int], torch.Tensor] = {}
    t2: dict[tuple[int, int], torch.Tensor] = {}
    deltas1 = {j: transfer1_delta(models[j], xt, yt, grads[j], cfg, scale)  # type: ignore[arg-type]
               for j in (sample if active.transfer1 else [])}
    deltas2 = {j: transfer2_delta(models[j], xt, yt, grads[j], cfg)  # type: ignore[arg-type]
               for j in (sample if active.transfer2 else [])}
    for i in (sample if transfer else []):
        deltas: list[torch.Tensor] = []
        keys: list[tuple[str, int]] = []
        for j in sample:
            if j == i:
                continue
            if active.transfer1:
                deltas.append(deltas1[j])
                keys.append(("t1", j))
            if active.transfer2:
                deltas.append(deltas2[j])
                keys.append(("t2", j))
        clean_i = losses[i]
        assert clean_i is not None
        per_image = clean_i.dim() > 0  # TrainConfig.transfer_clamp == "image"
        values = perturbed_losses(models[i], xt, yt, deltas, per_image, cfg.clean_bn_stats, batched)
        for (term, j), value in zip(keys, values, strict=True):
            (t1 if term == "t1" else t2)[(i, j)] = clamped_increase(value, clean_i, clamps(cfg))

    pairs = list(itertools.permutations(sample if transfer else [], 2))
    transfer1 = torch.stack([t1[p] for p in pairs]).mean() if t1 else zero
    transfer2 = torch.stack([t2[p] for p in pairs]).mean() if t2 else zero
    total = (cfg.w_class * classification + cfg.w_angle * angle + cfg.w_transfer1 * transfer1
             + cfg.w_transfer2 * transfer2)
    total, smooth = with_smoothness(total, grads, batch_size(x), cfg, active)
    return LossParts(total, classification, angle, transfer1, transfer2, smooth)
