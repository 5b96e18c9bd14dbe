"""Frozen models' clean losses and input gradients on the training images, each computed once.

Every growth step takes, for each of the S frozen models it samples, the model's cross-entropy and
input gradient at the step's pair images. Frozen models never change (evaluation copies, eval
mode), and without augmentation neither do the images, so those values are the same every epoch
and for every later new model. Each image's values are computed once, by the first step that needs
them, and read by every later one, which then skips that model's first-order pass. The objective is
unchanged; only where its values come from (`growth_loss(frozen_clean=...)`; tests check both
against each other).

Storing rows as steps first need them means the cache never adds a pass of its own. They cost
N·C·H·W floats per frozen model (63 MB for 20,000 Fashion-MNIST images), so models are cached until
`budget_bytes` is reached and the rest are computed per step as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deflect.data import ImageTensorDataset
from deflect.train.disjoint import autocast

DEFAULT_BUDGET_BYTES = 4 << 30  # beyond this, frozen models' values are computed per step


class FrozenClean:
    """Per-image cross-entropy and per-image input gradient ∇x CE_i of frozen models on `data`'s rows.

    A row is computed the first time a step needs it, from the step's own images, and read ever after,
    for every later new model too: the first epoch costs what it did without the cache, and no pass
    runs over images no step asks for. A model is keyed by identity: the grower's frozen list holds
    each evaluation copy for the whole run.
    """

    def __init__(self, data: ImageTensorDataset, device: torch.device, bf16: bool = False,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.size, self.shape = len(data), tuple(data.images.shape[1:])
        self.device, self.bf16, self.budget_bytes = device, bf16, budget_bytes
        self._rows: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # loss, grad, known

    @property
    def bytes_per_model(self) -> int:
        return self.size * (math.prod(self.shape) * 4 + 4 + 1)

    def known(self, model: nn.Module) -> int:
        """How many of `model`'s rows are stored."""
        return int(self._rows[model][2].sum()) if model in self._rows else 0

    def _room(self, model: nn.Module) -> bool:
        if model not in self._rows:
            if (len(self._rows) + 1) * self.bytes_per_model > self.budget_bytes:
                return False
            self._rows[model] = (torch.zeros(self.size, device=self.device),
                                 torch.zeros(self.size, *self.shape, device=self.device),
                                 torch.zeros(self.size, dtype=torch.bool, device=self.device))
        return True

    def rows(self, models: Sequence[nn.Module], index: torch.Tensor, x: torch.Tensor, y: torch.Tensor
             ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each model's (per-image losses, per-image gradients) at rows `index`, whose images and labels
        are `x`, `y`; rows not stored yet are computed from them. None when a model is over the budget
        (the step then computes every model's values itself)."""
        if not all(self._room(m) for m in models):
            return None
        index = index.to(self.device)
        out = []
        for model in models:
            losses, grads, known = self._rows[model]
            missing = ~known[index]
            if bool(missing.any()):
                loss, grad = per_image_gradients(model, x[missing], y[missing], self.bf16)
                rows = index[missing]
                losses[rows], grads[rows], known[rows] = loss, grad, True
            out.append((losses[index], grads[index]))
        return out


def per_image_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image cross-entropy and ∇x of each image's own cross-entropy (the sum's gradient), no graph.

    The batch-mean gradient over any m of these images is the rows' gradients over m, which is what
    `input_gradients` gives a step; for m a power of two (the usual batch and transfer-batch sizes)
    the two agree bit for bit, as scaling by 2⁻ᵏ commutes with every float operation on the way."""
    with torch.enable_grad(), autocast(x.device, bf16):
        x = x.detach().clone().requires_grad_(True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach().float(), grad.detach()
