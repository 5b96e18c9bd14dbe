"""Growing a set: the loss and the loop that train one new model against frozen ones.

The paper leaves open how to add models without retraining the set (§6). Here a new model is
trained alone, on its own classification loss plus the transfer terms of Eqs. 3/4 in both
directions and the angular term of Eq. 2, each over the pairs (new, frozen) of S frozen models
sampled per step. Frozen models are evaluation copies (`deflect.inference`: eval mode, BatchNorm
folded, parameters frozen): their input gradients are plain first-order gradients (no graph), so
each step costs 1 + S model passes and a few perturbed forwards, whatever the size of the set.
`transfer_batch` (objective-changing) computes every pair term (angle and transfer) on the first
images of each batch only, so the double backward, the dominant cost, covers those images alone.
Weights, ε and the term schedule are the parent run's (`TrainConfig`), so a grown model is held to
the same recipe as the models it joins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deflect.config import TrainConfig
from deflect.data import ImageTensorDataset
from deflect.train.disjoint import BatchEvent, EpochStats, epoch_generator, mean_objective, run_epoch
from deflect.train.distill import Teacher, distilled
from deflect.train.fast import perturbed_losses
from deflect.train.losses import (
    ActiveTerms,
    LossParts,
    angular_loss,
    clamped_increase,
    clamps,
    input_gradients,
    mean_loss,
    pair_rows,
    plain_loss,
    transfer1_delta,
    transfer2_delta,
    transfer_baseline,
    with_smoothness,
)

DEFAULT_SAMPLE = 2  # frozen models per step: 2·S ordered pairs per transfer term, S angular pairs


@dataclass
class GrowEvent(BatchEvent):
    """A batch of new model `model` (1-based) of `models` being grown."""

    model: int = 1
    models: int = 1


def _frozen_increase(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean_loss: torch.Tensor, deltas: Sequence[torch.Tensor],
    clamp: bool = True,
) -> list[torch.Tensor]:
    """loss_increase of a frozen (eval-mode) model under several perturbations in one forward.

    Eval mode makes every example independent of the others, so stacking the perturbed batches
    gives exactly the per-batch results with one call instead of one per term.
    """
    logits = model(torch.cat([x + d for d in deltas])).chunk(len(deltas))
    per_image = clean_loss.dim() > 0
    return [clamped_increase(plain_loss(z, y, per_image), clean_loss, clamp) for z in logits]


def growth_loss(
    new: nn.Module, frozen: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
    active: ActiveTerms,
    pair_scale: float = 1.0,
    *,
    create_graph: bool = True,
    batched: bool = False,
) -> LossParts:
    """w1·CE(new) + s·(w2·angle(new, f) + w3·T1 + w4·T2) over the pairs (new, f) of the `frozen` models given.

    s is `pair_scale` (`deflect grow --pair-scale`): a new model carries every pair term alone, against
    models that do not move, so a lighter s trades disjointness for clean accuracy.

    T1/T2 average 2·S terms: the new model under each frozen model's perturbation (frozen → new) and
    each frozen model under the new model's perturbation (new → frozen); the latter reaches the new
    model through its input gradient (double backprop), exactly as in the joint loss.
    `create_graph=False` (under `torch.no_grad()`) gives the value alone, for validation.
    `batched` sends the new model's 2·S perturbed inputs through it in one forward, BatchNorm per chunk
    (`deflect.train.fast`): the same values, fewer and larger kernels (`--step fast` on CUDA).
    """
    zero = x.new_zeros(())
    transfer = active.transfer1 or active.transfer2
    per_image = transfer and cfg.transfer_clamp == "image"  # the clean losses the transfer terms compare to
    m = pair_rows(cfg, len(x))
    if not (active.angle or transfer or active.smooth):
        loss_new, g_new, losses_f, grads_f = F.cross_entropy(new(x), y), None, [], []
    elif m == len(x):
        (pair_new,), (g_new,) = input_gradients([new], x, y, create_graph=create_graph, per_image=per_image)
        losses_f, grads_f = input_gradients(frozen, x, y, create_graph=False, per_image=per_image)
        loss_new = mean_loss(pair_new)
    else:
        # `transfer_batch` (objective-changing): classification on the whole batch, every pair term on
        # its first m images, through their own forward, so the double backward covers m images, not B.
        # The gradients are rescaled by m/B to the whole-batch mean's per-image size that ε1 and the
        # tanh scale are set for.
        loss_new = F.cross_entropy(new(x), y)
        (pair_new,), (g_new,) = input_gradients([new], x[:m], y[:m], create_graph=create_graph,
                                                per_image=per_image)
        losses_f, grads_f = input_gradients(frozen, x[:m], y[:m], create_graph=False, per_image=per_image)
        g_new, grads_f = g_new * (m / len(x)), [g * (m / len(x)) for g in grads_f]
    losses_f = [loss.detach() for loss in losses_f]
    xt, yt = x[:m], y[:m]
    angle = zero
    if active.angle:
        angle = torch.stack([angular_loss([g_new, g], cfg.cosine) for g in grads_f]).mean()
    t1_terms: list[torch.Tensor] = []
    t2_terms: list[torch.Tensor] = []
    if transfer:
        assert g_new is not None
        scale = x.shape[0] if cfg.eps1_per_sample else 1.0

        def deltas(source: nn.Module, g: torch.Tensor) -> list[torch.Tensor]:
            out = [transfer1_delta(source, xt, yt, g, cfg, scale)] if active.transfer1 else []
            return out + ([transfer2_delta(source, xt, yt, g, cfg)] if active.transfer2 else [])

        mine = deltas(new, g_new)
        base_new = transfer_baseline(pair_new, cfg)
        kinds = ([t1_terms] if active.transfer1 else []) + ([t2_terms] if active.transfer2 else [])
        theirs = [d for model, g_f in zip(frozen, grads_f, strict=True) for d in deltas(model, g_f)]
        perturbed = perturbed_losses(new, xt, yt, theirs, base_new.dim() > 0, cfg.clean_bn_stats, batched)
        rises = [clamped_increase(v, base_new, clamps(cfg)) for v in perturbed]  # frozen → new
        into_news = [rises[k * len(kinds):(k + 1) * len(kinds)] for k in range(len(frozen))]
        for model, loss_f, into_new in zip(frozen, losses_f, into_news, strict=True):
            into_frozen = _frozen_increase(model, xt, yt, loss_f, mine, clamps(cfg))  # new → frozen
            for terms, a, b in zip(kinds, into_new, into_frozen, strict=True):
                terms.extend((a, b))
    transfer1 = torch.stack(t1_terms).mean() if t1_terms else zero
    transfer2 = torch.stack(t2_terms).mean() if t2_terms else zero
    pairs = cfg.w_angle * angle + cfg.w_transfer1 * transfer1 + cfg.w_transfer2 * transfer2
    total, smooth = with_smoothness(cfg.w_class * loss_new + pair_scale * pairs, [g_new], len(x), cfg, active)
    return LossParts(total, loss_new, angle, transfer1, transfer2, smooth)


def sample_frozen(count: int, sample: int, gen: torch.Generator) -> list[int]:
    """`sample` of the `count` frozen models, drawn from the epoch's generator (all when fewer)."""
    return torch.randperm(count, generator=gen)[: min(sample, count)].sort().values.tolist()


def grow_epoch(
    new: nn.Module,
    frozen: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: ImageTensorDataset,
    cfg: TrainConfig,
    epoch: int,
    seed: int,
    sample: int,
    device: torch.device,
    on_batch: Callable[[BatchEvent], None] | None = None,
    pair_scale: float = 1.0,
    teacher: Teacher | None = None,
) -> EpochStats:
    """One epoch of the new model; batch order, augmentation and frozen samples seeded by (seed, epoch).
    A `teacher` (`deflect grow --teacher`) guides the new model's classification term."""
    gen = epoch_generator(seed, epoch)
    active = ActiveTerms.for_epoch(cfg, epoch)
    new.train()
    batched = cfg.step == "fast" and device.type == "cuda"  # as the joint fast step: a win on GPUs only

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        chosen = [frozen[i] for i in sample_frozen(len(frozen), sample, gen)]
        parts = growth_loss(new, chosen, x, y, cfg, active, pair_scale, batched=batched)
        return distilled(parts, [new], x, teacher, cfg)

    return run_epoch(batch_loss, optimizer, scheduler, data, cfg, epoch, gen, device, on_batch)


def growth_validation_loss(
    new: nn.Module, frozen: Sequence[nn.Module], data: ImageTensorDataset, cfg: TrainConfig,
    device: torch.device, batch_size: int, pair_scale: float = 1.0,
) -> float:
    """The growth objective on the validation split, eval mode, every configured term on.

    `frozen` is a fixed sample chosen once per new model, so epochs compare on the same pairs and
    validation, like training, costs the same for a set of 3 or of 30.
    """
    active = ActiveTerms.all_enabled(cfg)
    new.eval()
    return mean_objective(data, device, batch_size,
                          lambda x, y: growth_loss(new, frozen, x, y, cfg, active, pair_scale, create_graph=False))
