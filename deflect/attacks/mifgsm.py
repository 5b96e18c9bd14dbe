"""Momentum Iterative FGSM (Dong et al.), the paper's transfer-oriented L∞ attack."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deflect.attacks.base import Attack, ce_grad, check, project_linf


@dataclass(frozen=True)
class MIFGSM(Attack):
    """MI-FGSM: ``g ← μ·g + ∇/mean(|∇|)``, ``x ← Π_ε(x + α·sign(g))``, from a zero start.

    Accumulating L1-normalised gradients stabilises the update direction, which makes the
    examples transfer better between models (hence its use against randomly deployed models).
    ``decay`` is μ. Normalisation is per sample, as in the original paper and torchattacks.

    ``batch_l1=True`` reproduces a deviation of the paper's released code, which divided by
    the mean |∇| over the whole batch instead of per sample (so samples with small gradients
    barely contribute to their own momentum until the others shrink).
    """

    deterministic = True

    eps: float = 0.031
    alpha: float = 0.0031
    steps: int = 10
    decay: float = 1.0
    batch_l1: bool = False
    name: str = field(default="mifgsm", kw_only=True)

    def __post_init__(self) -> None:
        check(self.eps >= 0, f"mifgsm: eps must be >= 0, got {self.eps}")
        check(self.alpha >= 0, f"mifgsm: alpha must be >= 0, got {self.alpha}")
        check(self.decay >= 0, f"mifgsm: decay must be >= 0, got {self.decay}")
        check(
            int(self.steps) == self.steps and self.steps >= 1,
            f"mifgsm: steps must be an integer >= 1, got {self.steps}",
        )

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        momentum = torch.zeros_like(x)
        x_adv = x.clone()
        dims = tuple(range(x.dim())) if self.batch_l1 else tuple(range(1, x.dim()))
        tiny = torch.finfo(x.dtype).tiny  # only guards all-zero gradients (0/0 → NaN)
        for _ in range(int(self.steps)):
            grad = ce_grad(model, x_adv, y)
            grad = grad / grad.abs().mean(dim=dims, keepdim=True).clamp_min(tiny)
            momentum = grad + momentum * self.decay
            x_adv = project_linf(x_adv + self.alpha * momentum.sign(), x, self.eps)
        return x_adv
