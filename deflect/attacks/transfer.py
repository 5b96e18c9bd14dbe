"""DI-TI-MI-FGSM: the strongest gradient transfer attack deflect plays against random deployment.

The paper's transfer attacks (MI-FGSM, PGD) are crafted on one owned model with plain gradients;
an adaptive attacker adds everything known to improve transfer: momentum, input diversity (DI),
translation-invariant gradients (TI), many steps, random restarts, a logit-margin loss (CW) and an
ensemble of every model it owns (a sequence of models is attacked through its average logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deflect.attacks.base import Attack, check, margin_loss, per_sample, project_linf
from deflect.attacks.diversity import input_diversity, smooth_gradient

LOSSES = ("ce", "cw")


@dataclass(frozen=True)
class DiTiMIFGSM(Attack):
    """MI-FGSM with DI and TI, ``restarts`` runs per image and a CE or CW (logit-margin) loss.

    Each step: ``g = TI(∇ loss(model(DI(x'))))``, ``m ← μ·m + g/mean|g|``, ``x' ← Π_ε(x' + α·sign(m))``.
    ``loss="cw"`` maximises ``min(max_{i≠y} Z_i − Z_y, κ)``: unlike CE it keeps pushing the margin
    after the source is fooled (up to κ), which is what makes high-confidence examples transfer.
    The first run starts at ``x`` (``random_start`` draws it uniformly in the ε-ball instead); every
    further restart starts at a random point. Per image the run with the highest source loss,
    measured without DI, is kept. ``ti_size <= 1`` disables TI, ``diversity_prob=0`` disables DI.
    ``generator`` (default: the global RNG) must live on ``x``'s device.
    """

    eps: float = 0.031
    alpha: float = 0.0031
    steps: int = 10
    decay: float = 1.0
    restarts: int = 1
    loss: str = "ce"
    kappa: float = 40.0
    diversity_prob: float = 0.5
    min_scale: float = 0.8
    ti_size: int = 5
    ti_sigma: float = 1.0
    random_start: bool = False
    name: str = field(default="di-ti-mifgsm", kw_only=True)
    generator: torch.Generator | None = field(
        default=None, kw_only=True, repr=False, compare=False, metadata={"param": False}
    )

    def __post_init__(self) -> None:
        for key in ("eps", "alpha", "decay", "kappa"):
            check(getattr(self, key) >= 0, f"{self.name}: {key} must be >= 0, got {getattr(self, key)}")
        for key in ("steps", "restarts"):
            value = getattr(self, key)
            check(int(value) == value and value >= 1, f"{self.name}: {key} must be an integer >= 1, got {value}")
        check(self.loss in LOSSES, f"{self.name}: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        check(0 <= self.diversity_prob <= 1, f"{self.name}: diversity_prob must lie in [0, 1]")
        check(0 < self.min_scale <= 1, f"{self.name}: min_scale must lie in (0, 1], got {self.min_scale}")
        check(int(self.ti_size) == self.ti_size and (self.ti_size <= 1 or self.ti_size % 2 == 1),
              f"{self.name}: ti_size must be an odd integer (or <= 1 for no TI), got {self.ti_size}")
        check(self.ti_sigma > 0, f"{self.name}: ti_sigma must be > 0, got {self.ti_sigma}")

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample loss the attack ascends (CE, or the κ-capped misclassification margin)."""
        if self.loss == "cw":
            return -margin_loss(logits, y, self.kappa)
        return F.cross_entropy(logits, y, reduction="none")

    def _score(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
        """Restart selection: the source's loss without DI (CW: the uncapped margin)."""
        with torch.no_grad():
            logits = model(x_adv)
            if self.loss == "cw":
                return -margin_loss(logits, y, float("inf"))
            return F.cross_entropy(logits, y, reduction="none")

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, random_start: bool) -> Tensor:
        x_adv = x.clone()
        if random_start:
            noise = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
            x_adv = torch.clamp(x + (2 * noise - 1) * self.eps, 0.0, 1.0)
        momentum = torch.zeros_like(x)
        tiny = torch.finfo(x.dtype).tiny
        dims = tuple(range(1, x.dim()))
        for _ in range(int(self.steps)):
            x_var = x_adv.detach().requires_grad_(True)
            logits = model(input_diversity(x_var, self.diversity_prob, self.min_scale, self.generator))
            (grad,) = torch.autograd.grad(self.objective(logits, y).sum(), x_var)
            grad = smooth_gradient(grad, int(self.ti_size), self.ti_sigma)
            momentum = self.decay * momentum + grad / grad.abs().mean(dim=dims, keepdim=True).clamp_min(tiny)
            x_adv = project_linf(x_adv + self.alpha * momentum.sign(), x, self.eps)
        return x_adv

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        best = self._run(model, x, y, self.random_start)
        if int(self.restarts) == 1:
            return best
        best_score = self._score(model, best, y)
        for _ in range(int(self.restarts) - 1):
            cand = self._run(model, x, y, True)
            score = self._score(model, cand, y)
            better = score > best_score
            best = torch.where(per_sample(better, x), cand, best)
            best_score = torch.where(better, score, best_score)
        return best
