"""A small CNN for CPU work: three conv-BN-ReLU stages, global pooling, linear head.

BatchNorm is kept because the paper's PreAct ResNet18 has it and the disjoint loss runs its
perturbed forwards in train mode; the small net therefore exercises the same code paths.
"""

from __future__ import annotations

import torch
from torch import nn

from deflect.models.normalize import Normalize


def _stage(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=False),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


class SmallCNN(nn.Module):
    """Width-configurable CNN; pools twice for images ≥ 16 px, once for 8×8 digits."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        width: int = 32,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        big = image_size >= 16
        self.features = nn.Sequential(
            *_stage(in_channels, width, pool=True),
            *_stage(width, 2 * width, pool=big),
            *_stage(2 * width, 4 * width, pool=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))
