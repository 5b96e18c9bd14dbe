"""The paper's loss terms (Eqs. 1-5), written as the released code computes them.

Faithfulness notes (each differs from the paper's text, and the code produced its tables):
- input gradients g_j are those of the batch-mean cross-entropy and are *not* detached, so the
  transfer terms back-propagate into model j through a second-order path (double backprop);
- the angular term is the cosine normalised per (sample, channel) over H×W, averaged, plus 1:
  it pushes the cosine towards -1 rather than towards 0;
- the transfer terms clamp at zero *after* the batch mean, do not clamp x+δ to [0,1], and
  subtract model i's clean loss without detaching it;
- tanh(2e4·g) is the soft sign of Eq. 4.
Each term is averaged over the model pairs it covers (§5.1).

`TrainConfig.detach_clean` (deflect's option, off in every preset) detaches the clean loss the
transfer terms subtract. The live one is pushed up wherever a term is active: with the
`fashion-mnist` preset's weight 3 at n = 3, an image on which both other models' perturbations raise
model i's loss gets as much push up on its clean loss from each term as classification's push down.
That push is part of what makes the models disjoint: detached, a set of 3 fits better and loses the
CW κ = 40 side of the bar (results/fashion-mnist-transfer-steps.md).

`TrainConfig.transfer_clamp = "image"` (deflect's option, off in every paper-* preset) clamps each
image's loss increase before the batch mean instead. With the released clamp a term stops pulling
as soon as the *average* increase is ≤ 0, while many images still transfer (on Fashion-MNIST both
terms read ~0.00 by the third epoch with PGD black-box accuracy at 72 %); clamped per image
every image that still transfers keeps a gradient. The clean losses then travel per image: a 0-d
clean loss means the released clamp, a per-image vector the per-image clamp.
`transfer_clamp = "none"` (deflect's option, off in every preset) drops the clamp, as the clamp's
ablation: a term is the mean loss increase against a detached clean loss, so model i learns model
j's perturbed images (cross-training, as DVERGE does with its distilled images). The robustness
across the set lines the models' gradients up: a Fashion-MNIST set of 8 loses 12 points of
black-box accuracy, where the released clamp, which seldom acts there, loses none, and loses the same
12-13 points once its clean loss is detached (`--detach-clean`): the detached clean loss, not the
missing clamp, is what costs (results/fashion-mnist-unclamped.md).

`TrainConfig.clean_bn_stats` (deflect's option, off in every preset) keeps the perturbed forwards of
the transfer terms out of BatchNorm's running statistics. In training mode every forward updates
them (momentum 0.1), and a step's last forwards are the perturbed ones, so the statistics a model is
evaluated and deployed with describe perturbed images more than clean ones. Training is unchanged:
in training mode BatchNorm normalises with the batch's own statistics, so the parameters are
bit-identical with the option and without it; only the running statistics differ. The released
statistics are part of the defence: with clean ones a Fashion-MNIST set of 3 gains 0.01-0.23 points
of clean accuracy and loses 0.4-0.6 of PGD-20 black-box accuracy (results/fashion-mnist-transfer-steps.md).

`TrainConfig.transfer_steps = K > 1` (deflect's option, 1 in every preset) carries transfer term 2's
perturbation K − 1 sign-gradient steps further on its source model (`transfer2_delta`), on the
share `transfer_refine` of each batch (1: all of it). Sets trained on the one-step perturbation
deflect FGSM far better than PGD-20 (a set of 8 at w = 16: 85.9 % against 78.5 % black-box on
Fashion-MNIST at ε = 0.1), so the one step is not where the shared directions are.

`TrainConfig.transfer1_l2 = ρ` (deflect's option, unset in every preset) replaces transfer term 1's
ε1·g by a step of L2 length ρ along each image's own gradient (`transfer1_delta`), refined by
`transfer_steps` − 1 PGD-L2 steps on the `transfer_refine` share. Eq. 3's step is as long as the
gradient, tiny on images the source is sure of; CW κ = 40's examples move every image about 2.8 in L2
on Fashion-MNIST, and that distance, not the direction, is what transfers: PGD-L2 at the same radius
transfers about as well as CW, one gradient step of that length no more than random noise
(results/fashion-mnist-transfer1-l2.md).

`TrainConfig.w_smooth` (deflect's option, 0 in every preset) adds TRS's smoothness term (`smoothness`)
on the input gradients the step already takes. It shrinks them but lines them up across models, and
black-box accuracy falls (results/fashion-mnist-smoothness.md); it is there for comparisons with TRS.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deflect.attacks.base import ce_grad
from deflect.config import TrainConfig
from deflect.train.distributed import batch_mean, batch_size, cross_entropy_mean


@dataclass(frozen=True)
class ActiveTerms:
    """Which optional terms are switched on for the current epoch."""

    angle: bool = False
    transfer1: bool = False
    transfer2: bool = False
    smooth: bool = False

    @property
    def any(self) -> bool:
        return self.angle or self.transfer1 or self.transfer2 or self.smooth

    @classmethod
    def for_epoch(cls, cfg: TrainConfig, epoch: int) -> ActiveTerms:
        if cfg.method != "disjoint":
            return cls()
        return cls(
            angle=cfg.w_angle > 0 and cfg.angle_window.active(epoch),
            transfer1=cfg.w_transfer1 > 0 and cfg.transfer1_window.active(epoch),
            transfer2=cfg.w_transfer2 > 0 and cfg.transfer2_window.active(epoch),
            smooth=cfg.w_smooth > 0,
        )

    @classmethod
    def all_enabled(cls, cfg: TrainConfig) -> ActiveTerms:
        """Every term the configuration uses at some epoch (a fixed validation objective)."""
        if cfg.method != "disjoint":
            return cls()
        return cls(angle=cfg.w_angle > 0, transfer1=cfg.w_transfer1 > 0, transfer2=cfg.w_transfer2 > 0,
                   smooth=cfg.w_smooth > 0)


def idle_terms(cfg: TrainConfig) -> list[tuple[str, int]]:
    """Pair terms the configuration weights but none of its epochs switches on, with the epoch each
    window opens: a disjoint run shorter than its schedule trains as an independent set would."""
    used = ActiveTerms.all_enabled(cfg)
    epochs = [ActiveTerms.for_epoch(cfg, e) for e in range(1, cfg.epochs + 1)]
    idle = []
    for name, label, window in (("angle", "the angular term", cfg.angle_window),
                                ("transfer1", "transfer loss 1", cfg.transfer1_window),
                                ("transfer2", "transfer loss 2", cfg.transfer2_window)):
        if getattr(used, name) and not any(getattr(active, name) for active in epochs):
            idle.append((label, window.first))
    return idle


@dataclass
class LossParts:
    total: torch.Tensor
    classification: torch.Tensor
    angle: torch.Tensor
    transfer1: torch.Tensor
    transfer2: torch.Tensor
    smooth: torch.Tensor | None = None  # unweighted; None unless the run has a smoothness term (w_smooth > 0)

    def as_floats(self) -> dict[str, float]:
        values = {
            "total": float(self.total.detach()),
            "class": float(self.classification.detach()),
            "angle": float(self.angle.detach()),
            "transfer1": float(self.transfer1.detach()),
            "transfer2": float(self.transfer2.detach()),
        }
        return values if self.smooth is None else {**values, "smooth": float(self.smooth.detach())}


def input_gradients(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, create_graph: bool = True,
    per_image: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Cross-entropy L_i(x, y) of every model and its input gradient ∇x L_i, in one autograd call.

    Each model reads its own leaf copy of x, so one `grad` of the summed losses returns every
    model's gradient at once (the models share no parameters). The gradient is always that of the
    batch-mean loss; `per_image` returns each model's per-image losses instead of their mean.
    Grad mode is switched on here, so a caller that only reads the loss (validation) can run the
    rest under `torch.no_grad()` with `create_graph=False` and keep no forward's activations.
    """
    n = len(models)
    with torch.enable_grad():
        xs = x.detach().unsqueeze(0).expand(n, *x.shape).clone().requires_grad_(True)
        if per_image:
            images = [F.cross_entropy(m(xs[i]), y, reduction="none") for i, m in enumerate(models)]
            losses = [batch_mean(v) for v in images]
        else:
            losses = [cross_entropy_mean(m(xs[i]), y) for i, m in enumerate(models)]
        (grads,) = torch.autograd.grad(torch.stack(losses).sum(), xs, create_graph=create_graph)
    return (images if per_image else losses), list(grads.unbind(0))


def smoothness(grads: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    """Mean over models of the mean squared L2 norm of each image's own input gradient (TRS's term).

    TRS (Yang et al. 2021) bounds transfer between two models by their gradients' size as well as
    their alignment, on which alone the angular and transfer terms act; on Fashion-MNIST the term
    shrinks the gradients but lines them up, and transfer rises (see the module doc). `grads` are those
    of the batch-mean loss over `batch` images (rescaled to that size when taken on fewer, see
    `pair_rows`), so an image's own gradient is batch·g whatever the batch size.
    """
    return torch.stack([batch_mean((g * batch).flatten(1).pow(2).sum(1)) for g in grads]).mean()


def with_smoothness(
    total: torch.Tensor, grads: Sequence[torch.Tensor | None], batch: int, cfg: TrainConfig, active: ActiveTerms,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`total` with the smoothness term added last at its weight, and the term (None while it is off).
    The joint and growth steps share it, on the input gradients they took for the pair terms (models
    without one are skipped)."""
    if not active.smooth:
        return total, None
    smooth = smoothness([g for g in grads if g is not None], batch)
    return total + cfg.w_smooth * smooth, smooth


def pair_rows(cfg: TrainConfig, batch: int) -> int:
    """How many of a batch's first images the pair terms use: `transfer_batch` (objective-changing)
    when it is set and smaller than the batch, else the whole batch. Joint and growth steps share it."""
    tb = cfg.transfer_batch
    return tb if tb is not None and tb < batch else batch


def mean_loss(loss: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss, whether `loss` is already a mean or per image."""
    return loss if loss.dim() == 0 else batch_mean(loss)


def clamped_increase(perturbed: torch.Tensor, clean_loss: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """A transfer term from the losses under a perturbation (per image, or already their mean):
    max(mean − L, 0) against a batch-mean clean loss L (released code), the mean of each image's
    max(ℓ − ℓ_clean, 0) against per-image clean losses; without `clamp` (`transfer_clamp = "none"`)
    the plain mean − L, which goes below zero when the perturbation lowers the loss."""
    if clean_loss.dim() == 0:
        rise = mean_loss(perturbed) - clean_loss
        return torch.clamp(rise, min=0.0) if clamp else rise
    rises = perturbed - clean_loss
    return batch_mean(torch.clamp(rises, min=0.0) if clamp else rises)


def angular_loss(grads: Sequence[torch.Tensor], mode: str = "channel") -> torch.Tensor:
    """Mean pairwise cosine of input gradients plus 1 (Eq. 2 as the code computes it).

    `mode="channel"` normalises per (sample, channel) over H×W and averages the cosines over
    samples and channels (released code); `mode="sample"` uses one cosine per sample (Eq. 2).
    """
    start = 2 if mode == "channel" else 1
    normed = [F.normalize(g.flatten(start), dim=-1) for g in grads]
    cosines = [_per_sample(normed[i] * normed[j]) for i, j in itertools.combinations(range(len(normed)), 2)]
    return torch.stack(cosines).mean() + 1.0


def _per_sample(products: torch.Tensor) -> torch.Tensor:
    """Batch mean of the cosines (summed products), each sample's own cosines averaged first."""
    cos = products.sum(-1)
    return batch_mean(cos.flatten(1).mean(1) if cos.dim() > 1 else cos)


@contextlib.contextmanager
def running_stats_kept(model: nn.Module, keep: bool = True) -> Iterator[None]:
    """Within the block, `model`'s BatchNorm layers leave their running statistics alone (when `keep`).

    Training-mode forwards still normalise with the batch's statistics (and back-propagate through
    them) exactly as before; `TrainConfig.clean_bn_stats` wraps the transfer terms' perturbed
    forwards in it so that the statistics a model is deployed with come from clean images alone.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats] if keep else []
    for bn in bns:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn in bns:
            bn.track_running_stats = True


def refined_delta(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float, steps: int,
    share: float = 1.0, norm: str = "linf",
) -> torch.Tensor:
    """`delta` carried `steps` − 1 steps of 2.5·ε/steps up `model`'s loss, within the ε-ball of `norm`:
    sign-gradient steps within |δ| ≤ ε ("linf"), or per-image normalised gradient steps within
    ‖δ‖₂ ≤ ε ("l2", PGD-L2's step).

    `share` < 1 refines only the first ⌈share·B⌉ images and leaves the rest at the one-step δ, so a
    batch trains against both kinds of perturbation (one-step attacks such as FGSM find the one-step
    directions, iterative ones the refined) and the extra passes cost that share of the batch.

    Only the value moves: the result is δ + (δ_K − δ).detach(), so the gradient still reaches the
    source model through the one-step δ (the second-order path of Eqs. 3/4) and the extra steps
    cost first-order passes alone. They run inside `running_stats_kept`, so BatchNorm's running
    statistics never see the refining forwards, and under `torch.no_grad()` (validation) as well.
    """
    if steps <= 1:
        return delta
    alpha = 2.5 * eps / steps
    m = max(1, math.ceil(round(share * x.shape[0], 6)))  # 0.14 · 50 is 7.000000000000001 in floats: 7 images
    x, y = x[:m].detach(), y[:m]
    d = delta[:m].detach()
    with torch.enable_grad(), running_stats_kept(model):
        for _ in range(steps - 1):  # the attacks' PGD step, without their [0, 1] clip (Eqs. 3/4 have none)
            g = ce_grad(model, x + d, y)
            if norm == "l2":
                d = l2_ball(d + alpha * g / image_norms(g), eps)
            else:
                d = (d + alpha * g.sign()).clamp(-eps, eps)
    if m < delta.shape[0]:
        d = torch.cat([d, delta[m:].detach()])
    return delta + (d - delta).detach()


def image_norms(v: torch.Tensor) -> torch.Tensor:
    """Each image's L2 norm, shaped to broadcast over the image (never 0, so it can divide)."""
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def l2_ball(d: torch.Tensor, radius: float) -> torch.Tensor:
    """Each image's δ scaled back onto the L2 ball of `radius` when it lies outside."""
    return d * (radius / image_norms(d)).clamp(max=1.0)


def transfer1_delta(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, cfg: TrainConfig,
                    scale: float = 1.0) -> torch.Tensor:
    """Transfer term 1's perturbation crafted on `model` from its input gradient g: Eq. 3's ε1·g (times
    `scale`, the batch size under `eps1_per_sample`), or, with `cfg.transfer1_l2 = ρ`, a step of L2
    length ρ along each image's own gradient, refined like term 2's by `cfg.transfer_steps` − 1 PGD-L2
    steps. Eq. 3's step is as long as the gradient, tiny on an image the source model is sure of,
    while L2 attacks (CW, PGD-L2) move every image by about the same distance. The weights' gradient
    through g/‖g‖ grows as 1/‖g‖: an image with a vanishing gradient (below `image_norms`' floor)
    has δ = 0 and a very large derivative, which training on real images has not produced."""
    if cfg.transfer1_l2 is None:
        return cfg.eps1 * scale * g
    delta = cfg.transfer1_l2 * g / image_norms(g)
    return refined_delta(model, x, y, delta, cfg.transfer1_l2, cfg.transfer_steps, cfg.transfer_refine, "l2")


def transfer2_delta(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, cfg: TrainConfig
                    ) -> torch.Tensor:
    """Transfer term 2's perturbation crafted on `model` from its input gradient g: ε2·tanh(s·g) (Eq. 4),
    refined by `cfg.transfer_steps` − 1 further steps on a `cfg.transfer_refine` share of the batch when
    asked (see `refined_delta`)."""
    delta = cfg.eps2 * torch.tanh(cfg.tanh_scale * g)
    return refined_delta(model, x, y, delta, cfg.eps2, cfg.transfer_steps, cfg.transfer_refine)


def loss_increase(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean_loss: torch.Tensor, delta: torch.Tensor,
    keep_stats: bool = False, clamp: bool = True,
) -> torch.Tensor:
    """max(L_i(x+δ, y) − L_i(x, y), 0), the clamp applied after the batch mean (Eqs. 3-4); with
    per-image clean losses, the batch mean of each image's clamped increase; `clamp` False: no clamp
    (see `clamped_increase`). `keep_stats`: the perturbed forward leaves BatchNorm's running
    statistics alone (`TrainConfig.clean_bn_stats`)."""
    with running_stats_kept(model, keep_stats):
        logits = model(x + delta)
    return clamped_increase(plain_loss(logits, y, clean_loss.dim() > 0), clean_loss, clamp)


def clean_terms(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, active: ActiveTerms,
    sample: Sequence[int], *, create_graph: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor, torch.Tensor]:
    """Each model's clean loss (the transfer terms' baseline, `transfer_baseline`), the input
    gradients (with graph unless `create_graph` is False) the active terms need, and the
    classification and angular terms of Eq. 5. Models no term needs a gradient of get a plain
    forward. The clean losses are per image when ``cfg.transfer_clamp == "image"`` (see the module
    doc)."""
    n = len(models)
    transfer = active.transfer1 or active.transfer2
    per_image = cfg.transfer_clamp == "image" and transfer
    graph_models = set(range(n)) if active.angle else (set(sample) if transfer or active.smooth else set())
    losses: list[torch.Tensor | None] = [None] * n
    grads: list[torch.Tensor | None] = [None] * n
    order = sorted(graph_models)
    if order:
        ls, gs = input_gradients([models[i] for i in order], x, y, create_graph=create_graph, per_image=per_image)
        for k, i in enumerate(order):
            losses[i], grads[i] = ls[k], gs[k]
    clean = [loss if loss is not None else plain_loss(models[i](x), y, per_image) for i, loss in enumerate(losses)]
    ce = torch.stack([mean_loss(c) for c in clean])
    classification = ce.sum() if cfg.class_reduction == "sum" else ce.mean()
    angle = angular_loss(grads, cfg.cosine) if active.angle else x.new_zeros(())  # type: ignore[arg-type]
    return [transfer_baseline(c, cfg) for c in clean], grads, classification, angle


def transfer_baseline(clean_loss: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The clean loss a transfer term compares with: live, as in the released code (the term's
    gradient then also raises the clean loss of every image it is active on), or detached
    (`cfg.detach_clean`), so the term only lowers the perturbed loss. Unclamped terms
    (`transfer_clamp = "none"`) always get it detached: a live one would reward raising it without bound."""
    return clean_loss.detach() if cfg.detach_clean or not clamps(cfg) else clean_loss


def clamps(cfg: TrainConfig) -> bool:
    """Whether the transfer terms clamp the loss increase at zero (every setting but `transfer_clamp = "none"`)."""
    return cfg.transfer_clamp != "none"


def plain_loss(logits: torch.Tensor, y: torch.Tensor, per_image: bool) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none") if per_image else cross_entropy_mean(logits, y)


def disjoint_loss(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    active: ActiveTerms,
    sample: Sequence[int] | None = None,
    *,
    create_graph: bool = True,
) -> LossParts:
    """Eq. 5: w1·L_class + w2·L_angle + w3·L_transfer1 + w4·L_transfer2.

    `sample` lists the models whose ordered pairs enter the transfer terms (all when None);
    classification and the angular term always cover every model, as in main_sample.py.
    This is the plain per-pair reference: one forward per (i, j, term). `create_graph=False`
    (under `torch.no_grad()`) gives the value alone, for validation.
    """
    n = len(models)
    sample = list(range(n)) if sample is None else list(sample)
    zero = x.new_zeros(())
    transfer = active.transfer1 or active.transfer2
    losses, grads, classification, angle = clean_terms(models, x, y, cfg, active, sample, create_graph=create_graph)
    t1_terms: list[torch.Tensor] = []
    t2_terms: list[torch.Tensor] = []
    scale = batch_size(x) if cfg.eps1_per_sample else 1.0
    deltas1 = {j: transfer1_delta(models[j], x, y, grads[j], cfg, scale)  # type: ignore[arg-type]
               for j in (sample if active.transfer1 else [])}
    deltas2 = {j: transfer2_delta(models[j], x, y, grads[j], cfg)  # type: ignore[arg-type]
               for j in (sample if active.transfer2 else [])}
    for i, j in itertools.permutations(sample if transfer else [], 2):
        assert losses[i] is not None
        if active.transfer1:
            t1_terms.append(loss_increase(models[i], x, y, losses[i], deltas1[j], cfg.clean_bn_stats, clamps(cfg)))
        if active.transfer2:
            t2_terms.append(loss_increase(models[i], x, y, losses[i], deltas2[j], cfg.clean_bn_stats, clamps(cfg)))
    transfer1 = torch.stack(t1_terms).mean() if t1_terms else zero
    transfer2 = torch.stack(t2_terms).mean() if t2_terms else zero
    total = (
        cfg.w_class * classification
        + cfg.w_angle * angle
        + cfg.w_transfer1 * transfer1
        + cfg.w_transfer2 * transfer2
    )
    total, smooth = with_smoothness(total, grads, batch_size(x), cfg, active)
    return LossParts(total, classification, angle, transfer1, transfer2, smooth)
