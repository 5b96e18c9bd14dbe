"""Carlini–Wagner L2 attack with a single constant c (no binary search), as in Table 1."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deflect.attacks.base import Attack, check, check_unfooled, fooled, margin_loss, per_sample

#: Shrink factor before arctanh, from Carlini's reference code: keeps pixels at exactly 0 or 1
#: at a finite tanh-space value so they can still move (torchattacks maps them to ±inf).
_TANH_SHRINK = 1 - 1e-6


@dataclass(frozen=True)
class CW(Attack):
    """CW-L2: minimise ``‖δ‖₂² + c·max(Z_y − max_{i≠y} Z_i, −κ)`` with Adam in tanh space.

    The tanh change of variables keeps every iterate inside [0, 1] without clipping. For each
    sample the smallest-L2 iterate that is misclassified with logit margin ≥ κ is kept. A sample
    never fooled with that margin comes back as the last iterate (``unfooled="last"``, as the
    paper's released evaluation code returns it): with one constant c and a large κ the margin is
    rarely reached, yet the last iterate is what a transfer attacker would send, so returning the
    clean image would score such an attack as no attack at all. ``unfooled="clean"`` returns the
    input instead (torchattacks' and Carlini's convention, where success is
    ``model(x_adv).argmax(1) != y``).

    ``early_stop`` (default, torchattacks' rule) ends the run when the batch loss, checked
    every ``max(steps // 10, 1)`` iterations, has increased since the last check.

    Differences from ``torchattacks.CW``: the success test applies the κ margin (Carlini's
    reference code does; torchattacks accepts any misclassification), ``max_{i≠y}`` is taken
    properly (torchattacks masks the true logit to 0, wrong when all other logits are
    negative), and pixels at exactly 0/1 stay movable (see ``_TANH_SHRINK``).
    """

    deterministic = True

    c: float = 1.0
    kappa: float = 0.0
    steps: int = 1000
    lr: float = 0.01
    early_stop: bool = True
    unfooled: str = "last"
    name: str = field(default="cw", kw_only=True)

    def __post_init__(self) -> None:
        check(self.c >= 0, f"cw: c must be >= 0, got {self.c}")
        check(self.kappa >= 0, f"cw: kappa must be >= 0, got {self.kappa}")
        check(self.lr > 0, f"cw: lr must be > 0, got {self.lr}")
        check(
            int(self.steps) == self.steps and self.steps >= 1,
            f"cw: steps must be an integer >= 1, got {self.steps}",
        )
        check_unfooled("cw", self.unfooled)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        w = torch.atanh((2 * x - 1) * _TANH_SHRINK).detach().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=self.lr)
        best = x.clone()
        best_l2 = torch.full((x.shape[0],), math.inf, device=x.device, dtype=x.dtype)
        prev_cost = math.inf
        check_every = max(int(self.steps) // 10, 1)
        stopped = False
        for step in range(int(self.steps)):
            x_adv = 0.5 * (torch.tanh(w) + 1)
            l2 = (x_adv - x).pow(2).flatten(1).sum(dim=1)
            logits = model(x_adv)
            cost = l2.sum() + (self.c * margin_loss(logits, y, self.kappa)).sum()
            (w.grad,) = torch.autograd.grad(cost, w)
            optimizer.step()

            with torch.no_grad():
                improved = fooled(logits, y, self.kappa) & (l2 < best_l2)
                best_l2 = torch.where(improved, l2, best_l2)
                best = torch.where(per_sample(improved, x), x_adv, best)

            if self.early_stop and step % check_every == 0:
                cost_value = cost.item()
                if cost_value > prev_cost:
                    stopped = True
                    break
                prev_cost = cost_value
        if self.unfooled == "clean":
            return best
        # the released code returns the iterate it stopped at, or the one after the last step
        last = x_adv.detach() if stopped else 0.5 * (torch.tanh(w.detach()) + 1)
        return torch.where(per_sample(torch.isfinite(best_l2), x), best, last)
