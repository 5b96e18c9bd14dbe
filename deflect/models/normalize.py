"""Input normalisation as a layer, so attacks and users always work in [0,1] pixel space."""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """(x − mean) / std per channel; buffers travel with the model's state dict."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
