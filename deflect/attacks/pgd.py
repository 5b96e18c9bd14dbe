"""Projected Gradient Descent under an L∞ budget (Madry et al.)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deflect.attacks.base import Attack, ce_grad, check, project_linf


@dataclass(frozen=True)
class PGD(Attack):
    """L∞ PGD: uniform random start in [−ε, ε], ``steps`` sign-gradient steps of size α, each
    followed by projection onto the ε-ball and the [0, 1] box.

    The strongest first-order L∞ attack in the paper's Table 1 and the one used for the
    ε-sweep (see :func:`deflect.attacks.pgd_sweep_attack`). The start is drawn exactly as
    torchattacks draws it (``torch.empty_like(x).uniform_(-eps, eps)`` on the global RNG unless
    ``generator`` is given; it must live on ``x``'s device), so the same seed gives the same
    result as ``torchattacks.PGD``.
    """

    eps: float = 0.031
    alpha: float = 0.0078
    steps: int = 7
    random_start: bool = True
    name: str = field(default="pgd", kw_only=True)
    generator: torch.Generator | None = field(
        default=None, kw_only=True, repr=False, compare=False, metadata={"param": False}
    )

    def __post_init__(self) -> None:
        check(self.eps >= 0, f"pgd: eps must be >= 0, got {self.eps}")
        check(self.alpha >= 0, f"pgd: alpha must be >= 0, got {self.alpha}")
        check(
            int(self.steps) == self.steps and self.steps >= 1,
            f"pgd: steps must be an integer >= 1, got {self.steps}",
        )

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = x.clone()
        if self.random_start:
            noise = torch.empty_like(x).uniform_(-self.eps, self.eps, generator=self.generator)
            x_adv = torch.clamp(x_adv + noise, 0.0, 1.0).detach()
        for _ in range(int(self.steps)):
            grad = ce_grad(model, x_adv, y)
            x_adv = project_linf(x_adv + self.alpha * grad.sign(), x, self.eps)
        return x_adv
