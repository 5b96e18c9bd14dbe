"""`--clean-bn-stats`: the transfer terms' perturbed forwards leave BatchNorm's running statistics
alone, and change nothing else (deflect.train.losses.running_stats_kept). The CLI flag is tested with
`--detach-clean` in test_transfer_steps.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from deflect.config import make_config
from deflect.data import dataset_info
from deflect.inference import inference_copy
from deflect.models import build_model
from deflect.train.fast import fast_disjoint_loss
from deflect.train.grow import growth_loss
from deflect.train.losses import ActiveTerms, disjoint_loss, running_stats_kept


def _setup(n: int = 3, batch: int = 32):
    torch.manual_seed(0)
    info = dataset_info("fashion-mnist")
    models = [build_model("cnn", info, width=8) for _ in range(n)]
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    return models, x, y, make_config(n, "fashion-mnist", width=8)


def _step(fn, models, x, y, cfg, **kw):
    """One loss and backward from fresh copies: (loss parts, parameter gradients, BN buffers)."""
    models = copy.deepcopy(models)
    for m in models:
        m.train()
    parts = fn(models, x, y, cfg, ActiveTerms.all_enabled(cfg), **kw)
    parts.total.backward()
    grads = [p.grad.clone() for m in models for p in m.parameters()]
    buffers = [b.clone() for m in models for name, b in m.named_buffers() if "running" in name]
    return parts, grads, buffers


STEPS = {
    "reference": lambda m, x, y, c, a: disjoint_loss(m, x, y, c, a),
    "fast": lambda m, x, y, c, a: fast_disjoint_loss(m, x, y, c, a),
    "fast-batched": lambda m, x, y, c, a: fast_disjoint_loss(m, x, y, c, a, batched=True),
    "fast-transfer-batch": lambda m, x, y, c, a: fast_disjoint_loss(
        m, x, y, dataclasses.replace(c, transfer_batch=16), a),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_the_option_changes_the_running_statistics_alone(step: str) -> None:
    """Same loss, bit-identical gradients; running statistics that no perturbation reaches: with the
    option they are the same whatever ε2 is, without it they move with ε2."""
    models, x, y, cfg = _setup()
    fn = STEPS[step]
    kept = dataclasses.replace(cfg, clean_bn_stats=True)
    plain, plain_grads, plain_stats = _step(fn, models, x, y, cfg)
    clean, clean_grads, clean_stats = _step(fn, models, x, y, kept)
    assert float(clean.transfer2.detach()) > 0  # the perturbed forwards under test ran
    assert torch.equal(clean.total.detach(), plain.total.detach())
    for a, b in zip(plain_grads, clean_grads, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(plain_stats, clean_stats, strict=True))

    far = dataclasses.replace(kept, eps2=0.5, eps1=60.0)
    _, _, far_stats = _step(fn, models, x, y, far)
    for a, b in zip(clean_stats, far_stats, strict=True):
        assert torch.equal(a, b)
    _, _, plain_far_stats = _step(fn, models, x, y, dataclasses.replace(cfg, eps2=0.5, eps1=60.0))
    assert any(not torch.allclose(a, b) for a, b in zip(plain_stats, plain_far_stats, strict=True))


def test_reference_statistics_are_those_of_the_clean_forward() -> None:
    """With the option, the one forward per model that sees clean images is all the statistics record:
    the same as a train-mode forward of the clean batch alone (a step without the pair terms)."""
    models, x, y, cfg = _setup()
    _, _, stats = _step(STEPS["reference"], models, x, y, dataclasses.replace(cfg, clean_bn_stats=True))
    twins = copy.deepcopy(models)
    with torch.no_grad():
        for m in twins:
            m.train()(x)
    expected = [b for m in twins for name, b in m.named_buffers() if "running" in name]
    for a, b in zip(stats, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_growth_keeps_the_new_models_statistics_clean() -> None:
    models, x, y, cfg = _setup()
    new, frozen = models[0], [inference_copy(m, "cpu") for m in models[1:]]

    def grow(models, x, y, cfg, active):
        return growth_loss(models[0], frozen, x, y, cfg, active)

    kept = dataclasses.replace(cfg, clean_bn_stats=True)
    _, grads, stats = _step(grow, [new], x, y, kept)
    _, plain_grads, plain_stats = _step(grow, [new], x, y, cfg)
    _, _, far_stats = _step(grow, [new], x, y, dataclasses.replace(kept, eps2=0.5, eps1=60.0))
    for a, b in zip(grads, plain_grads, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(stats, far_stats, strict=True))
    assert any(not torch.allclose(a, b) for a, b in zip(stats, plain_stats, strict=True))


def test_running_stats_kept_restores_tracking_and_leaves_eval_alone() -> None:
    model = build_model("cnn", dataset_info("digits"), width=8)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [b.running_mean.clone() for b in bns]
    x = torch.rand(16, 1, 8, 8)
    with running_stats_kept(model.train()):
        model(x)
    assert all(b.track_running_stats for b in bns)
    assert all(torch.equal(a, b.running_mean) for a, b in zip(before, bns, strict=True))
    with running_stats_kept(model, keep=False):
        model(x)
    assert not torch.equal(before[0], bns[0].running_mean)
    model.eval()
    out = model(x)
    with running_stats_kept(model):
        assert torch.equal(model(x), out)  # eval mode still normalises with the running statistics
