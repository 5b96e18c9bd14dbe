"""Validation losses give the training objective's value without keeping any forward's activations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deflect.config import make_config
from deflect.data import ImageTensorDataset, dataset_info
from deflect.models import build_model
from deflect.train.disjoint import validation_loss
from deflect.train.grow import growth_loss, growth_validation_loss
from deflect.train.losses import ActiveTerms, disjoint_loss, input_gradients


def setup(n: int, clamp: str, images: int = 40):
    torch.manual_seed(0)
    info = dataset_info("fashion-mnist")
    models = [build_model("cnn", info, width=4).double().eval() for _ in range(n)]
    data = ImageTensorDataset(torch.rand(images, 1, 28, 28).double(), torch.randint(0, 10, (images,)), info)
    cfg = dataclasses.replace(make_config(n, "fashion-mnist", width=4), transfer_clamp=clamp)
    return models, data, cfg


def batches(data: ImageTensorDataset, size: int):
    for start in range(0, len(data) - 1, size):
        yield data.batch(torch.arange(start, min(start + size, len(data))))


class SavedTensors:
    """Counts the tensors autograd saves for a backward while it is entered."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> SavedTensors:
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


@pytest.mark.parametrize("clamp", ["batch", "image", "none"])
def test_validation_loss_is_the_objective_with_graph_kept_only_for_input_gradients(clamp: str) -> None:
    models, data, cfg = setup(4, clamp)
    active = ActiveTerms.all_enabled(cfg)
    assert active.angle and active.transfer1 and active.transfer2
    with_graph = [float(disjoint_loss(models, x, y, cfg, active).total.detach()) * len(y) for x, y in batches(data, 16)]
    with SavedTensors() as val_saved:
        val = validation_loss(models, data, cfg, torch.device("cpu"), 16)
    assert val == pytest.approx(sum(with_graph) / len(data), rel=1e-10)
    # the only saved tensors are those the input gradients need; the 2·n(n-1) pair forwards save none
    with SavedTensors() as grads_saved:
        for x, y in batches(data, 16):
            input_gradients(models, x, y, create_graph=False, per_image=clamp == "image")
    assert val_saved.count == grads_saved.count > 0
    assert all(p.requires_grad for m in models for p in m.parameters())


def test_growth_validation_loss_is_the_growth_objective() -> None:
    models, data, cfg = setup(3, "image")
    new, frozen = models[0], models[1:]
    active = ActiveTerms.all_enabled(cfg)
    with_graph = [float(growth_loss(new, frozen, x, y, cfg, active, 1.5).total.detach()) * len(y)
                  for x, y in batches(data, 16)]
    with SavedTensors() as saved:
        val = growth_validation_loss(new, frozen, data, cfg, torch.device("cpu"), 16, 1.5)
    assert val == pytest.approx(sum(with_graph) / len(data), rel=1e-10)
    with SavedTensors() as grads_saved:
        for x, y in batches(data, 16):
            input_gradients([new], x, y, create_graph=False, per_image=True)
            input_gradients(frozen, x, y, create_graph=False, per_image=True)
    assert saved.count == grads_saved.count > 0
