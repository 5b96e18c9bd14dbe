"""EAD: elastic-net attack (Chen et al.) with a single constant c and the "EN" decision rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deflect.attacks.base import Attack, check, check_unfooled, fooled, margin_loss, per_sample


def shrink(z: Tensor, x: Tensor, beta: float) -> Tensor:
    """Projected shrinkage-thresholding: the proximal step of ``β‖δ‖₁`` within [0, 1].

    Coordinates within β of the original are snapped back to it, the rest move β closer,
    which is what makes EAD's perturbations sparse.
    """
    diff = z - x
    upper = torch.clamp(z - beta, max=1.0)
    lower = torch.clamp(z + beta, min=0.0)
    return torch.where(diff > beta, upper, torch.where(diff < -beta, lower, x))


@dataclass(frozen=True)
class EAD(Attack):
    """EAD-EN: minimise ``c·max(Z_y − max_{i≠y} Z_i, −κ) + ‖δ‖₂² + β‖δ‖₁`` by (F)ISTA.

    Gradient steps on the smooth part use ``lr·(1 − k/steps)^0.5`` (the reference code's
    polynomial decay), followed by :func:`shrink`; ``fista=True`` adds the
    ``k/(k+3)`` momentum of the reference implementation. Among iterates misclassified with
    margin ≥ κ, the one with the smallest ``β·L1 + L2²`` is kept ("EN" rule); a sample never
    fooled with that margin comes back as the last feasible iterate (``unfooled="last"``, as the
    paper's released code does), or unchanged with ``unfooled="clean"`` (torchattacks).

    ``early_stop`` (default, as in the reference code and torchattacks) ends the run when
    the batch loss, checked every ``max(steps // 10, 1)`` iterations, is not below
    0.999999× its value at the last check. Unlike ``torchattacks.EADEN`` the κ margin is
    applied per sample, and the reference image is not shifted by the first gradient step
    (torchattacks aliases its copy of the input with the optimised variable).
    """

    deterministic = True

    c: float = 20.0
    kappa: float = 0.0
    beta: float = 0.01
    steps: int = 1000
    lr: float = 0.01
    fista: bool = True
    early_stop: bool = True
    unfooled: str = "last"
    name: str = field(default="ead", kw_only=True)

    def __post_init__(self) -> None:
        check(self.c >= 0, f"ead: c must be >= 0, got {self.c}")
        check(self.kappa >= 0, f"ead: kappa must be >= 0, got {self.kappa}")
        check(self.beta >= 0, f"ead: beta must be >= 0, got {self.beta}")
        check(self.lr > 0, f"ead: lr must be > 0, got {self.lr}")
        check(
            int(self.steps) == self.steps and self.steps >= 1,
            f"ead: steps must be an integer >= 1, got {self.steps}",
        )
        check_unfooled("ead", self.unfooled)

    def _loss(self, logits: Tensor, y: Tensor, l2: Tensor) -> Tensor:
        return (self.c * margin_loss(logits, y, self.kappa)).sum() + l2.sum()

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        steps = int(self.steps)
        x_k = x.clone()  # feasible iterate (after shrinkage)
        y_k = x.clone()  # slack / momentum iterate where gradients are taken
        best = x.clone()
        best_en = torch.full((x.shape[0],), math.inf, device=x.device, dtype=x.dtype)
        prev_loss = math.inf
        check_every = max(steps // 10, 1)
        for k in range(steps):
            lr = self.lr * (1 - k / steps) ** 0.5
            y_k = y_k.detach().requires_grad_(True)
            l2_y = (y_k - x).pow(2).flatten(1).sum(dim=1)
            (grad,) = torch.autograd.grad(self._loss(model(y_k), y, l2_y), y_k)
            new_x = shrink(y_k.detach() - lr * grad, x, self.beta)
            if self.fista:
                zt = (k + 1) / (k + 4)
                y_k = new_x + zt * (new_x - x_k)
            else:
                y_k = new_x
            x_k = new_x

            with torch.no_grad():
                logits = model(x_k)
                delta = (x_k - x).flatten(1)
                l2 = delta.pow(2).sum(dim=1)
                l1 = delta.abs().sum(dim=1)
                if self.early_stop and k % check_every == 0:
                    loss = (self._loss(logits, y, l2) + self.beta * l1.sum()).item()
                    if loss > prev_loss * 0.999999:
                        break
                    prev_loss = loss
                en = l2 + self.beta * l1
                improved = fooled(logits, y, self.kappa) & (en < best_en)
                best_en = torch.where(improved, en, best_en)
                best = torch.where(per_sample(improved, x), x_k, best)
        if self.unfooled == "clean":
            return best
        return torch.where(per_sample(torch.isfinite(best_en), x), best, x_k.detach())
