"""Training of disjoint and baseline sets."""

from deflect.train.losses import (
    ActiveTerms,
    LossParts,
    angular_loss,
    disjoint_loss,
    input_gradients,
)
from deflect.train.runner import Callbacks, build_set, resolve_device, train

__all__ = [
    "ActiveTerms", "Callbacks", "LossParts", "angular_loss", "build_set", "disjoint_loss",
    "input_gradients", "resolve_device", "train",
]
