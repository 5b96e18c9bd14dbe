"""Square attack (Andriushchenko et al. 2020), L∞: a score-based query attack, no gradients.

Random deployment only helps when the attacker cannot query its victim. An attacker who can send
inputs to one client and read its scores needs neither owned models nor transfer: random search
over square-shaped ±2ε updates, accepted when the victim's margin drops, finds an adversarial
example for that client. This attack measures how many queries that costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deflect.attacks.base import Attack, ModelLike, check, checked_inputs, eval_mode, margin_loss, per_sample


@dataclass
class SquareResult:
    """Per image: the adversarial input, queries spent (forward passes through the victim, the
    initial one included) and whether the victim misclassifies it."""

    x_adv: Tensor
    queries: Tensor
    success: Tensor


def p_schedule(p_init: float, it: int, max_queries: int) -> float:
    """Share of pixels a square covers at iteration ``it``: the paper's piecewise halving,
    rescaled to a budget of ``max_queries`` (as the reference code's ``rescale_schedule``)."""
    it = int(it / max_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


@dataclass(frozen=True)
class Square(Attack):
    """Square-L∞ with the margin loss ``Z_y − max_{i≠y} Z_i``, stopping per image at success.

    Start: vertical stripes of ±ε. Each iteration, every still-unbroken image gets a square of side
    ``round(sqrt(p·H·W))`` at its own random position, set to ``x ± ε`` (one random sign per channel,
    ``x_best + 2ε·sign`` projected, as in the paper), and keeps it if its margin decreases. No image is
    queried more than ``max_queries`` times. ``seed`` makes the search reproducible.
    """

    deterministic = True

    eps: float = 0.031
    max_queries: int = 5000
    p_init: float = 0.8
    seed: int = 0
    name: str = field(default="square", kw_only=True)

    def __post_init__(self) -> None:
        check(self.eps >= 0, f"square: eps must be >= 0, got {self.eps}")
        check(int(self.max_queries) == self.max_queries and self.max_queries >= 1,
              f"square: max_queries must be an integer >= 1, got {self.max_queries}")
        check(0 < self.p_init <= 1, f"square: p_init must lie in (0, 1], got {self.p_init}")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self._search(model, x, y).x_adv

    def run(self, model: ModelLike, x: Tensor, y: Tensor) -> SquareResult:
        """Attack and report per-image query counts and success (``__call__`` returns ``x_adv`` only)."""
        net, x, y = checked_inputs(model, x, y)
        if not x.numel():
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            return SquareResult(x.clone(), empty, empty.bool())
        with eval_mode(net):
            return self._search(net, x, y)

    @torch.no_grad()
    def _search(self, model: nn.Module, x: Tensor, y: Tensor) -> SquareResult:
        n, c, h, w = x.shape
        dev = x.device
        gen = torch.Generator(device=dev).manual_seed(int(self.seed))

        def signs(*shape: int) -> Tensor:
            return torch.randint(0, 2, shape, generator=gen, device=dev).to(x.dtype) * 2 - 1

        x_best = torch.clamp(x + self.eps * signs(n, c, 1, w), 0.0, 1.0)
        margin = margin_loss(model(x_best), y, math.inf)
        queries = torch.ones(n, dtype=torch.long, device=dev)
        rows = torch.arange(h, device=dev).view(1, 1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, 1, w)
        for it in range(int(self.max_queries) - 1):
            active = (margin >= 0).nonzero().flatten()
            if not len(active):
                break
            m = len(active)
            side = max(1, min(h, w, round(math.sqrt(p_schedule(self.p_init, it, int(self.max_queries)) * h * w))))
            top = torch.randint(0, h - side + 1, (m,), generator=gen, device=dev).view(m, 1, 1, 1)
            left = torch.randint(0, w - side + 1, (m,), generator=gen, device=dev).view(m, 1, 1, 1)
            inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
            x_a, best_a = x[active], x_best[active]
            cand = torch.where(inside, best_a + 2 * self.eps * signs(m, c, 1, 1), best_a)
            cand = torch.clamp(torch.minimum(torch.maximum(cand, x_a - self.eps), x_a + self.eps), 0.0, 1.0)
            new_margin = margin_loss(model(cand), y[active], math.inf)
            queries[active] += 1
            better = new_margin < margin[active]
            margin[active] = torch.where(better, new_margin, margin[active])
            x_best[active] = torch.where(per_sample(better, cand), cand, best_a)
        return SquareResult(x_best, queries, margin < 0)
