"""`--transfer1-l2 ρ`: transfer term 1's perturbation as an L2 step of length ρ per image along the
source model's gradient, refined by `--transfer-steps` as PGD-L2 (deflect.train.losses)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import deflect
from deflect.cli import app
from deflect.config import make_config
from deflect.data import dataset_info
from deflect.inference import inference_copy
from deflect.models import build_model
from deflect.store import Store
from deflect.train.grow import growth_loss
from deflect.train.losses import ActiveTerms, disjoint_loss, transfer1_delta

runner = CliRunner()


def _digits_batch(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return deflect.load_dataset("digits", "test").batch(torch.arange(count))


def _norms(d: torch.Tensor) -> torch.Tensor:
    return d.detach().flatten(1).norm(dim=1)


def test_without_the_option_term_1_is_eq_3() -> None:
    model = build_model("cnn", dataset_info("digits"), width=8)
    x, y = _digits_batch()
    g = torch.randn_like(x)
    cfg = make_config(3, "digits")
    assert cfg.transfer1_l2 is None
    assert torch.equal(transfer1_delta(model, x, y, g, cfg), cfg.eps1 * g)
    assert torch.equal(transfer1_delta(model, x, y, g, cfg, 64.0), cfg.eps1 * 64.0 * g)


def test_one_step_has_length_rho_along_each_images_gradient() -> None:
    model = build_model("cnn", dataset_info("digits"), width=8)
    x, y = _digits_batch()
    g = torch.randn_like(x) * torch.logspace(-6, 1, 64).view(-1, 1, 1, 1)  # gradients of very different sizes
    cfg = make_config(3, "digits", transfer1_l2=0.7)
    delta = transfer1_delta(model, x, y, g, cfg, scale=64.0)  # the batch-size scale of Eq. 3 plays no part
    assert torch.allclose(_norms(delta), torch.full((64,), 0.7), atol=1e-5)
    assert torch.allclose(F.cosine_similarity(delta.flatten(1), g.flatten(1)), torch.ones(64), atol=1e-5)


def test_refinement_raises_the_source_loss_within_the_ball(digits_runs) -> None:
    store, ids = digits_runs
    model = deflect.load_set(ids["independent"], store)[0]
    model.train()
    x, y = _digits_batch()
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xs), y), xs, create_graph=True)
    one_cfg = make_config(3, "digits", transfer1_l2=0.5)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    one = transfer1_delta(model, x, y, g, one_cfg)
    refined = transfer1_delta(model, x, y, g, dataclasses.replace(one_cfg, transfer_steps=5))
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())  # running statistics untouched
    assert float(_norms(refined).max()) <= 0.5 + 1e-5
    with torch.no_grad():
        assert float(F.cross_entropy(model(x + refined), y)) > float(F.cross_entropy(model(x + one), y)) + 0.02
    # the value is the refined one, the gradient to the weights the one-step path's (through ∇/‖∇‖)
    weights = torch.randn_like(x)
    params = list(model.parameters())
    via_refined = torch.autograd.grad((weights * refined).sum(), params, retain_graph=True, allow_unused=True)
    via_one = torch.autograd.grad((weights * one).sum(), params, allow_unused=True)
    assert any(a is not None and float(a.abs().sum()) > 0 for a in via_one)
    for a, b in zip(via_refined, via_one, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_term_1_of_the_reference_step_uses_the_l2_perturbation() -> None:
    """Transfer term 1 of Eq. 5 is the mean over ordered pairs of model i's clamped loss rise at x + δ_j."""
    torch.manual_seed(0)
    models = [build_model("cnn", dataset_info("digits"), width=8).eval() for _ in range(3)]
    x, y = _digits_batch(32)
    cfg = make_config(3, "digits", transfer1_l2=1.0)
    parts = disjoint_loss(models, x, y, cfg, ActiveTerms(transfer1=True))
    rises = []
    for i in range(3):
        for j in range(3):
            if i != j:
                xs = x.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(models[j](xs), y), xs)
                with torch.no_grad():
                    rise = F.cross_entropy(models[i](x + g / _norms(g).view(-1, 1, 1, 1)), y) \
                        - F.cross_entropy(models[i](x), y)
                rises.append(max(float(rise), 0.0))
    term = float(parts.transfer1.detach())
    assert term == pytest.approx(sum(rises) / 6, rel=1e-4, abs=1e-6) and term > 0
    eq3 = disjoint_loss(models, x, y, make_config(3, "digits"), ActiveTerms(transfer1=True))
    assert float(eq3.transfer1.detach()) != pytest.approx(term, rel=1e-3)


def test_growth_loss_uses_the_l2_perturbation_both_ways(digits_runs) -> None:
    """T1 of a growth step averages 2·S clamped rises: the new model at x + ρ·ĝ_f of each frozen model f,
    and each frozen model at x + ρ·ĝ_new (batch clamp, the released one, to compute by hand)."""
    store, ids = digits_runs
    new, *frozen = deflect.load_set(ids["independent"], store)
    new.eval()
    frozen = [inference_copy(m, "cpu") for m in frozen]
    x, y = _digits_batch(32)
    cfg = make_config(3, "digits", transfer1_l2=1.5, transfer_clamp="batch")
    parts = growth_loss(new, frozen, x, y, cfg, ActiveTerms(transfer1=True))

    def unit_step(model: torch.nn.Module) -> torch.Tensor:
        xs = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xs), y), xs)
        return 1.5 * F.normalize(g.flatten(1), dim=1).view_as(g)

    def rise(model: torch.nn.Module, delta: torch.Tensor) -> float:
        with torch.no_grad():
            return max(float(F.cross_entropy(model(x + delta), y) - F.cross_entropy(model(x), y)), 0.0)

    rises = [r for f in frozen for r in (rise(new, unit_step(f)), rise(f, unit_step(new)))]
    assert float(parts.transfer1.detach()) == pytest.approx(sum(rises) / len(rises), rel=1e-4, abs=1e-6)
    assert min(rises) > 0  # both directions carry weight in the check
    # refined on the new model in training mode, as a grow step runs it
    new.train()
    one = growth_loss(new, frozen, x, y, cfg, ActiveTerms(transfer1=True)).as_floats()
    five = growth_loss(new, frozen, x, y, dataclasses.replace(cfg, transfer_steps=5),
                       ActiveTerms(transfer1=True)).as_floats()
    assert five["transfer1"] > one["transfer1"] > 0


def test_a_share_refines_the_leading_images_of_term_1() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", dataset_info("digits"), width=8).eval()
    x, y = _digits_batch(64)
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xs), y), xs)
    cfg = make_config(3, "digits", transfer1_l2=0.8, transfer_steps=4, transfer_refine=0.3)
    part = transfer1_delta(model, x, y, g, cfg)
    one = 0.8 * F.normalize(g.flatten(1), dim=1).view_as(g)
    assert torch.allclose(part[20:], one[20:], atol=1e-6)  # ⌈0.3 · 64⌉ = 20 images refined, the rest one step
    assert all(not torch.allclose(part[i], one[i], atol=1e-4) for i in range(20))


def test_the_one_step_gradient_reaches_the_source_through_the_normalised_gradient() -> None:
    """The weights' gradient through ρ·g/‖g‖ equals autograd's through an independent formula of it
    (F.normalize), so the part of ∂(g/‖g‖)/∂g that removes g's own direction is kept."""
    torch.manual_seed(0)
    model = build_model("cnn", dataset_info("digits"), width=8).eval()
    x, y = _digits_batch(16)
    params = list(model.parameters())
    weights = torch.randn_like(x)
    cfg = make_config(3, "digits", transfer1_l2=0.6)
    grads = []
    for fn in (lambda g: transfer1_delta(model, x, y, g, cfg),
               lambda g: 0.6 * F.normalize(g.flatten(1), dim=1).view_as(g)):
        xs = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xs), y), xs, create_graph=True)
        grads.append(torch.autograd.grad((weights * fn(g)).sum(), params, allow_unused=True))
    for a, b in zip(*grads, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert any(a is not None and float(a.abs().sum()) > 0 for a in grads[0])


def test_cli_stores_the_option_grows_with_it_and_refuses_bad_values(store: Store) -> None:
    db = ["--db", str(store.path)]
    result = runner.invoke(app, ["train", "--n", "3", "--epochs", "2", "--limit", "320", "--width", "8",
                                 "--transfer1-l2", "0.5", *db, "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["config"]["transfer1_l2"] == 0.5
    rows = store.epochs(run["id"])
    assert rows[0].loss_transfer1 == 0 and rows[1].loss_transfer1 > 0  # the digits preset: on from epoch 2
    grown = runner.invoke(app, ["grow", run["id"], "--epochs", "1", *db, "--json"])
    assert grown.exit_code == 0, grown.output
    assert json.loads(grown.stdout)["config"]["transfer1_l2"] == 0.5  # the parent's recipe
    before = len(store.list_runs())
    for args, message in ((["--transfer1-l2", "0"], "--transfer1-l2 must be a finite number > 0, got 0.0"),
                          (["--transfer1-l2", "1e999"], "--transfer1-l2 must be a finite number > 0, got inf"),
                          (["--transfer1-l2", "1", "--eps1", "3"], "--transfer1-l2 replaces ε1's step"),
                          (["--transfer1-l2", "1", "--eps1-per-sample"], "drop --eps1-per-sample"),
                          (["--transfer1-l2", "1", "--method", "independent"], "--transfer1-l2")):
        bad = runner.invoke(app, ["train", *args, *db])
        assert bad.exit_code == 2 and message in bad.stderr, bad.output
        assert len(bad.stderr.strip().splitlines()) == 1
    assert len(store.list_runs()) == before  # the refused runs stored nothing
