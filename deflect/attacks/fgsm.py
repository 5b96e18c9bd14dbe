"""Single-step gradient attacks: FGSM (L∞), FGM (L2) and R+FGSM (random step, then FGSM)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deflect.attacks.base import Attack, ce_grad, check, per_sample, project_linf


@dataclass(frozen=True)
class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow et al.): ``x + eps·sign(∇ CE)``, clamped to [0, 1].

    The cheapest L∞ attack; the paper uses it as the weakest white-box baseline.
    """

    deterministic = True

    eps: float = 0.031
    name: str = field(default="fgsm", kw_only=True)

    def __post_init__(self) -> None:
        check(self.eps >= 0, f"fgsm: eps must be >= 0, got {self.eps}")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        grad = ce_grad(model, x, y)
        return torch.clamp(x + self.eps * grad.sign(), 0.0, 1.0)


@dataclass(frozen=True)
class FGM(Attack):
    """Fast Gradient Method, L2 version: one step ``x + eps·g/‖g‖₂`` per sample.

    The step is normalised over each whole sample, then projected onto the ε-ball (a no-op up
    to rounding) so the result equals ``torchattacks.PGDL2(eps=ε, alpha=ε, steps=1,
    random_start=False)``.

    ``per_channel=True`` reproduces a deviation of the paper's released code, which
    normalised the gradient per (sample, channel); the perturbation's L2 norm is then up to
    ``eps·sqrt(C)`` and is deliberately not projected back, to match that code.
    """

    deterministic = True

    eps: float = 1.0
    per_channel: bool = False
    name: str = field(default="fgm", kw_only=True)

    #: Added to gradient norms before dividing, as torchattacks does, so zero gradients stay 0.
    tiny: float = field(default=1e-10, kw_only=True, repr=False, metadata={"param": False})

    def __post_init__(self) -> None:
        check(self.eps >= 0, f"fgm: eps must be >= 0, got {self.eps}")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.eps == 0:  # avoids 0/0 in the projection below
            return x.clone()
        grad = ce_grad(model, x, y)
        n = x.shape[0]
        if self.per_channel:
            norms = grad.flatten(2).norm(p=2, dim=2) + self.tiny  # (N, C)
            step = grad / norms.view(*norms.shape, *([1] * (x.dim() - 2)))
            return torch.clamp(x + self.eps * step, 0.0, 1.0)
        norms = grad.reshape(n, -1).norm(p=2, dim=1) + self.tiny
        x_adv = x + self.eps * (grad / per_sample(norms, x))
        delta = x_adv - x
        delta_norms = delta.reshape(n, -1).norm(p=2, dim=1)
        factor = torch.clamp(self.eps / delta_norms, max=1.0)
        return torch.clamp(x + delta * per_sample(factor, x), 0.0, 1.0)


@dataclass(frozen=True)
class RFGSM(Attack):
    """R+FGSM (Tramèr et al.): ``x' = x + α·sign(N(0, I))``, then ``x' + (ε−α)·sign(∇ CE(x'))``.

    The random first step escapes the gradient-masking "kink" at the data point that defeats
    plain FGSM. ``alpha=None`` means ``eps/2`` (the paper's setting). The result is projected
    onto the ε-ball, which only guards rounding since ``α + (ε−α) = ε``; with ``alpha=eps/2``
    it equals ``torchattacks.RFGSM(eps, alpha, steps=1)`` for the same seed.

    ``generator=None`` draws the random sign from the global torch RNG (like torchattacks);
    a given generator must live on ``x``'s device.
    """

    eps: float = 0.031
    alpha: float | None = None
    name: str = field(default="rfgsm", kw_only=True)
    generator: torch.Generator | None = field(
        default=None, kw_only=True, repr=False, compare=False, metadata={"param": False}
    )

    def __post_init__(self) -> None:
        check(self.eps >= 0, f"rfgsm: eps must be >= 0, got {self.eps}")
        check(
            0 <= self.step_alpha <= self.eps,
            f"rfgsm: alpha must lie in [0, eps={self.eps}], got {self.alpha}",
        )

    @property
    def step_alpha(self) -> float:
        """The random-step size actually used (``eps/2`` when ``alpha`` is None)."""
        return self.eps / 2 if self.alpha is None else self.alpha

    def __repr__(self) -> str:  # shows the resolved alpha rather than None
        return f"RFGSM(eps={self.eps!r}, alpha={self.step_alpha!r}, name={self.name!r})"

    def params(self) -> dict[str, object]:
        out = super().params()
        out["alpha"] = float(self.step_alpha)
        return out

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        alpha = self.step_alpha
        if self.generator is None:
            noise = torch.randn_like(x)
        else:
            noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)
        x_adv = torch.clamp(x + alpha * noise.sign(), 0.0, 1.0).detach()
        grad = ce_grad(model, x_adv, y)
        return project_linf(x_adv + (self.eps - alpha) * grad.sign(), x, self.eps)
