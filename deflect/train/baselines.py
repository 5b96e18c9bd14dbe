"""The peers' training objectives, so deflect can train its own baselines on the same data and models.

- fast-AT ("Fast is better than free", Wong et al. 2020; locuslab/fast_adversarial): each model is
  trained on its own FGSM examples with a uniform random start in the ε-ball (clamped to the image
  range) and one step of α = 1.25·ε; the models never see each other.
- ADP (Pang et al. 2019; P2333/Adaptive-Diverse-Ensemble): the members are trained jointly on
  Σ CE − α·H(mean prediction) − β·log det(G), where G is the Gram matrix of the members' normalised
  non-true-class probability vectors (α = 2, β = 0.5, log-det offset 1e-6, as in their code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deflect.attacks import CIFAR10_LINF_EPS, budget_for

FAST_AT_ALPHA = 1.25  # step size as a multiple of ε
ADP_ALPHA, ADP_BETA = 2.0, 0.5
ADP_LOG_OFFSET, ADP_DET_OFFSET = 1e-20, 1e-6


def dataset_eps(dataset: str) -> float:
    """The L∞ budget deflect evaluates `dataset` at (0.031 on CIFAR-10, 0.1 Fashion-MNIST, 0.15 digits)."""
    return CIFAR10_LINF_EPS * budget_for(dataset).linf_scale


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
            gen: torch.Generator) -> torch.Tensor:
    """One FGSM step from a uniform random start, kept in the ε-ball and in [0, 1] (train mode, as
    the reference code crafts with the model it trains)."""
    start = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device, x.dtype) * eps
    delta = (torch.clamp(x + start, 0.0, 1.0) - x).requires_grad_(True)
    loss = F.cross_entropy(model(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = torch.clamp(delta.detach() + alpha * grad.sign(), -eps, eps)
    return torch.clamp(x + delta, 0.0, 1.0).detach()


def fast_at_loss(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, eps: float,
                 gen: torch.Generator, frozen: Sequence[int] = ()) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ over models of CE on their own FGSM-RS examples; `frozen` models (stopped early) are skipped."""
    alpha = FAST_AT_ALPHA * eps
    losses = []
    for i, m in enumerate(models):
        if i in frozen:
            continue
        losses.append(F.cross_entropy(m(fgsm_rs(m, x, y, eps, alpha, gen)), y))
    total = torch.stack(losses).sum() if losses else x.new_zeros(())
    return total, {"total": float(total.detach()), "class": float(total.detach()), "adv": float(total.detach())}


def adp_terms(logits: Sequence[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ CE, ensemble entropy, mean log-det) of ADP for one batch."""
    probs = torch.stack([F.softmax(z, dim=1) for z in logits], dim=1)  # B × n × K
    ce = torch.stack([F.cross_entropy(z, y) for z in logits]).sum()
    mean = probs.mean(1)
    entropy = -(mean * torch.log(mean + ADP_LOG_OFFSET)).sum(1).mean()
    others = probs * (1 - F.one_hot(y, probs.shape[-1]).to(probs.dtype)).unsqueeze(1)
    others = F.normalize(others, dim=-1)
    gram = others @ others.transpose(1, 2)
    eye = torch.eye(len(logits), dtype=gram.dtype, device=gram.device)
    log_det = torch.logdet(gram + ADP_DET_OFFSET * eye).mean()
    return ce, entropy, log_det


def adp_loss(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, alpha: float = ADP_ALPHA,
             beta: float = ADP_BETA) -> tuple[torch.Tensor, dict[str, float]]:
    ce, entropy, log_det = adp_terms([m(x) for m in models], y)
    total = ce - alpha * entropy - beta * log_det
    return total, {"total": float(total.detach()), "class": float(ce.detach()), "entropy": float(entropy.detach()),
                   "log_det": float(log_det.detach())}


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def robust_first_batch(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, eps: float,
                       seed: int) -> list[float]:
    """PGD-5 (α = ε/4, random start) accuracy of each model on one fixed training batch.

    Wong et al. watch this number to catch catastrophic overfitting: FGSM training can suddenly
    lose all PGD robustness within an epoch. deflect measures it in eval mode (the reference code
    uses train mode), so the check does not move BatchNorm's running statistics.
    """
    from deflect.attacks import PGD

    attack = PGD(eps=eps, alpha=eps / 4, steps=5, generator=torch.Generator(device=x.device).manual_seed(seed))
    accs = []
    for m in models:
        was_training = m.training
        m.eval()
        accs.append(_correct(m, attack(m, x, y), y))
        m.train(was_training)
    return accs


def catastrophic(previous: Sequence[float] | None, current: Sequence[float], drop: float = 0.2) -> list[int]:
    """Models whose first-batch PGD accuracy fell by more than `drop` since the previous epoch."""
    if previous is None:
        return []
    return [i for i, (a, b) in enumerate(zip(previous, current, strict=True)) if b - a < -drop]
