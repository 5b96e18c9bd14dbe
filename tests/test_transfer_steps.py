"""`--transfer-steps` / `--transfer-refine`: transfer term 2's perturbation refined by sign steps on a
share of each batch (deflect.train.losses)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import deflect
from deflect.cli import app
from deflect.config import make_config
from deflect.data import dataset_info
from deflect.inference import inference_copy
from deflect.models import build_model
from deflect.store import Store
from deflect.train.fast import fast_disjoint_loss
from deflect.train.grow import growth_loss
from deflect.train.losses import ActiveTerms, disjoint_loss, refined_delta, transfer2_delta

runner = CliRunner()


def _digits_batch(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return deflect.load_dataset("digits", "test").batch(torch.arange(count))


def test_one_step_is_the_papers_perturbation() -> None:
    model = build_model("cnn", dataset_info("digits"), width=8)
    x, y = _digits_batch()
    delta = torch.rand_like(x)
    assert refined_delta(model, x, y, delta, 0.1, 1) is delta
    g = torch.randn_like(x)
    cfg = make_config(3, "digits")
    assert torch.equal(transfer2_delta(model, x, y, g, cfg), cfg.eps2 * torch.tanh(cfg.tanh_scale * g))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_refinement_from_zero_is_torchattacks_pgd(digits_runs, norm: str) -> None:
    """From δ = 0, K steps are PGD (L∞, term 2's; L2, term 1's under --transfer1-l2) with K − 1 steps of
    2.5ε/K and no random start; images inside [ε, 1 − ε] keep torchattacks' [0, 1] clip out of the comparison."""
    torchattacks = pytest.importorskip("torchattacks")
    store, ids = digits_runs
    model = deflect.load_set(ids["independent"], store)[0].eval()
    x, y = _digits_batch()
    x = 0.2 + 0.6 * x
    eps, steps = (0.1, 5) if norm == "linf" else (0.15, 5)
    ours = refined_delta(model, x, y, torch.zeros_like(x), eps, steps, norm=norm)
    pgd = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    theirs = pgd(model, eps=eps, alpha=2.5 * eps / steps, steps=steps - 1, random_start=False)(x, y) - x
    assert torch.allclose(ours, theirs, atol=1e-5 if norm == "l2" else 1e-6)
    if norm == "linf":
        assert float(ours.abs().max()) == pytest.approx(eps)
    else:
        assert float(ours.flatten(1).norm(dim=1).max()) == pytest.approx(eps, rel=1e-5)
        assert float(ours.abs().max()) > 0.05  # an L2 step, not clipped to a small L∞ box


def test_refinement_raises_the_source_loss_and_keeps_the_one_step_gradient(digits_runs) -> None:
    store, ids = digits_runs
    model = deflect.load_set(ids["independent"], store)[0]
    model.train()  # as in training: BatchNorm on batch statistics, running statistics must not move
    x, y = _digits_batch()
    cfg = dataclasses.replace(make_config(3, "digits"), transfer_steps=5)
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xs), y), xs, create_graph=True)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    one = cfg.eps2 * torch.tanh(cfg.tanh_scale * g)
    refined = transfer2_delta(model, x, y, g, cfg)
    assert model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert float(refined.detach().abs().max()) <= cfg.eps2 + 1e-7
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert float(ce(model(x + refined), y)) > float(ce(model(x + one), y)) + 0.05
    # the value is the refined one, the gradient to the model's weights the one-step path's
    weights = torch.randn_like(x)
    params = [p for p in model.parameters()]
    via_refined = torch.autograd.grad((weights * refined).sum(), params, retain_graph=True, allow_unused=True)
    via_one = torch.autograd.grad((weights * one).sum(), params, allow_unused=True)
    assert any(a is not None and float(a.abs().sum()) > 0 for a in via_one)
    for a, b in zip(via_refined, via_one, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_a_share_refines_the_leading_images_and_leaves_the_rest_one_step(digits_runs) -> None:
    store, ids = digits_runs
    model = deflect.load_set(ids["independent"], store)[0]
    model.train()
    x, y = _digits_batch(64)
    xs = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xs), y), xs, create_graph=True)
    cfg = dataclasses.replace(make_config(3, "digits"), transfer_steps=5)
    one = cfg.eps2 * torch.tanh(cfg.tanh_scale * g)
    whole = transfer2_delta(model, x, y, g, cfg)
    assert torch.equal(whole, refined_delta(model, x, y, one, cfg.eps2, 5, 1.0))
    for share, m in ((0.5, 32), (0.3, 20), (0.001, 1)):
        part = transfer2_delta(model, x, y, g, dataclasses.replace(cfg, transfer_refine=share))
        alone = refined_delta(model, x[:m], y[:m], one[:m], cfg.eps2, 5)
        assert torch.allclose(part[:m], alone, atol=1e-7)  # refined exactly as a batch of its own
        assert not torch.allclose(part[:m], one[:m])
        assert torch.equal(part[m:].detach(), one[m:].detach())  # the rest keeps Eq. 4's step
        weights = torch.randn_like(x)
        params = list(model.parameters())
        via_part = torch.autograd.grad((weights * part).sum(), params, retain_graph=True, allow_unused=True)
        via_one = torch.autograd.grad((weights * one).sum(), params, retain_graph=True, allow_unused=True)
        for a, b in zip(via_part, via_one, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    # the share rounds up to whole images, and float error does not add one: 0.14 of 50 is 7
    tail = refined_delta(model, x[:50], y[:50], one[:50], cfg.eps2, 5, 0.14)
    assert torch.equal(tail[7:].detach(), one[7:50].detach()) and not torch.allclose(tail[6], one[6])


@pytest.mark.parametrize("term1", [None, 1.5], ids=["eq3-term1", "l2-term1"])
def test_fast_step_equals_the_reference_with_refined_perturbations(term1: float | None) -> None:
    torch.manual_seed(0)
    info = dataset_info("fashion-mnist")
    models = [build_model("cnn", info, width=8) for _ in range(3)]
    twins = copy.deepcopy(models)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    cfg = make_config(3, "fashion-mnist", width=8, transfer_steps=4, transfer1_l2=term1)
    active = ActiveTerms.all_enabled(cfg)
    results = []
    for fn, ms, kw in ((disjoint_loss, models, {}), (fast_disjoint_loss, twins, {"batched": True})):
        for m in ms:
            m.train()
        parts = fn(ms, x, y, cfg, active, **kw)
        parts.total.backward()
        results.append((parts, [p.grad.clone() for m in ms for p in m.parameters()],
                        [b.clone() for m in ms for b in m.buffers()]))
    (ref, ref_grads, ref_buffers), (fast, fast_grads, fast_buffers) = results
    for name in ("total", "transfer1", "transfer2"):
        assert float(getattr(fast, name).detach()) == pytest.approx(float(getattr(ref, name).detach()), abs=1e-5,
                                                                    rel=1e-4)
    for a, b in zip(ref_grads, fast_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(ref_buffers, fast_buffers, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert float(ref.transfer1.detach()) > 0
    one = disjoint_loss(copy.deepcopy(models), x, y, dataclasses.replace(cfg, transfer_steps=1), active)
    assert float(ref.transfer2.detach()) > float(one.transfer2.detach())  # the refined perturbation transfers more
    with torch.no_grad():  # the validation objective: values alone, no graph
        value = disjoint_loss(models, x, y, cfg, active, create_graph=False)
    assert value.total.grad_fn is None and torch.isfinite(value.total)


def test_growth_loss_refines_both_directions(digits_runs) -> None:
    store, ids = digits_runs
    new, *frozen = deflect.load_set(ids["independent"], store)
    new.eval()
    frozen = [inference_copy(m, "cpu") for m in frozen]
    x, y = _digits_batch(32)
    cfg = make_config(3, "digits")
    active = ActiveTerms(transfer2=True)
    one = growth_loss(new, frozen, x, y, cfg, active).as_floats()
    five = growth_loss(new, frozen, x, y, dataclasses.replace(cfg, transfer_steps=5), active).as_floats()
    assert five["transfer2"] > one["transfer2"] > 0
    assert five["class"] == one["class"]


def test_cli_train_and_grow_store_the_steps(store: Store) -> None:
    db = ["--db", str(store.path)]
    result = runner.invoke(app, ["train", "--n", "2", "--epochs", "3", "--limit", "320", "--width", "8",
                                 "--transfer-steps", "3", "--transfer-refine", "0.5", *db, "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["config"]["transfer_steps"] == 3 and run["config"]["transfer_refine"] == 0.5
    rows = store.epochs(run["id"])
    assert [r.epoch for r in rows] == [1, 2, 3]
    assert rows[0].loss_transfer2 == 0 and math.isfinite(rows[2].loss_transfer2) and rows[2].loss_transfer2 >= 0
    grown = runner.invoke(app, ["grow", run["id"], "--epochs", "1", *db, "--json"])
    assert grown.exit_code == 0, grown.output
    grow_info = json.loads(grown.stdout)["config"]["grow"]
    assert grow_info["transfer_steps"] == 3 and grow_info["transfer_refine"] == 0.5  # the parent's recipe
    again = runner.invoke(app, ["grow", run["id"], "--epochs", "1", "--transfer-steps", "1",
                                "--transfer-refine", "1", *db, "--json"])
    assert json.loads(again.stdout)["config"]["transfer_steps"] == 1
    assert json.loads(again.stdout)["config"]["transfer_refine"] == 1.0
    bad = runner.invoke(app, ["train", "--transfer-steps", "0", *db])
    assert bad.exit_code == 2 and "--transfer-steps must be at least 1" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    for value in ("0", "1.5"):
        bad = runner.invoke(app, ["grow", run["id"], "--transfer-refine", value, *db])
        assert bad.exit_code == 2 and f"--transfer-refine must be in (0, 1], got {float(value)}" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert len(store.list_runs()) == 3  # the refused run stored nothing


@pytest.mark.parametrize("flag", ["--detach-clean", "--clean-bn-stats"])
def test_cli_flag_is_stored_and_grown_with(store: Store, flag: str) -> None:
    """`--detach-clean` and `--clean-bn-stats` reach the stored config, a grown model keeps the
    parent's choice, the run's transfer terms stay finite, and both are off unless asked for (the
    released code's live clean loss and running statistics)."""
    key = flag[2:].replace("-", "_")
    db = ["--db", str(store.path)]
    # n = 3: a pair of models, pushed apart by the angular term in epoch 1, transfers nothing (both terms 0)
    result = runner.invoke(app, ["train", "--n", "3", "--epochs", "2", "--limit", "320", "--width", "8",
                                 flag, *db, "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["config"][key] is True
    rows = store.epochs(run["id"])
    assert rows[0].loss_transfer1 == rows[0].loss_transfer2 == 0.0  # the digits preset: on from epoch 2
    for term in (rows[1].loss_transfer1, rows[1].loss_transfer2):
        assert math.isfinite(term) and term > 0
    grown = runner.invoke(app, ["grow", run["id"], "--epochs", "1", *db, "--json"])
    assert grown.exit_code == 0, grown.output
    assert json.loads(grown.stdout)["config"][key] is True
    plain = runner.invoke(app, ["train", "--n", "2", "--epochs", "1", "--limit", "320", "--width", "8", *db, "--json"])
    assert json.loads(plain.stdout)["config"][key] is False
