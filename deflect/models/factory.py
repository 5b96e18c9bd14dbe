"""Build a model from an architecture name and a dataset description."""

from __future__ import annotations

from torch import nn

from deflect.data import DatasetInfo
from deflect.errors import DeflectError
from deflect.models.cnn import SmallCNN
from deflect.models.preact_resnet import PreActResNet18

ARCHS = ("cnn", "preact-resnet18")


def build_model(arch: str, info: DatasetInfo, normalize: bool = True, width: int = 32) -> nn.Module:
    """A fresh model for `info`; `normalize=False` feeds raw [0,1] pixels (the released code)."""
    mean = info.mean if normalize else (0.0,) * info.channels
    std = info.std if normalize else (1.0,) * info.channels
    if arch == "cnn":
        return SmallCNN(info.channels, info.num_classes, info.size, mean, std, width=width)
    if arch == "preact-resnet18":
        return PreActResNet18(info.channels, info.num_classes, mean, std)
    raise DeflectError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
