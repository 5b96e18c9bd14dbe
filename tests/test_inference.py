"""Evaluation copies compute the same function and input gradient as the trained models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn
from typer.testing import CliRunner

import deflect
from deflect.attacks import make_attack
from deflect.cli import app
from deflect.data import dataset_info
from deflect.evaluate import select_subset, task_seed, transfer_matrix
from deflect.inference import GlobalAvgPool, bf16_crafting, bf16_supported, eval_batch_size, inference_copy
from deflect.models import build_model


def _trained_like(arch: str, dataset: str, width: int = 8) -> nn.Module:
    """A model whose BatchNorm statistics and affine terms are far from their initial values."""
    torch.manual_seed(0)
    model = build_model(arch, dataset_info(dataset), width=width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.train()


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return g


@pytest.mark.parametrize(("arch", "dataset", "size"), [("cnn", "fashion-mnist", 28), ("cnn", "digits", 8),
                                                       ("preact-resnet18", "cifar10", 32)])
def test_copy_matches_logits_and_input_gradient(arch: str, dataset: str, size: int) -> None:
    model = _trained_like(arch, dataset)
    info = dataset_info(dataset)
    x = torch.rand(6, info.channels, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10
    fast = inference_copy(model, "cpu")
    model.eval()
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(_input_grad(fast, x, y), _input_grad(model, x, y), atol=1e-5, rtol=1e-3)


def test_global_pool_of_a_copy_keeps_values_gradient_and_the_input_layout() -> None:
    z = torch.randn(5, 8, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(5, 8, 1, 1)
    (ref,) = torch.autograd.grad(nn.AdaptiveAvgPool2d(1)(z), z, g)
    out = GlobalAvgPool()(z)
    (got,) = torch.autograd.grad(out, z, g)
    assert torch.allclose(out, nn.AdaptiveAvgPool2d(1)(z), atol=1e-6) and torch.equal(got, ref)
    relu_in = torch.relu(z)  # the gradient reaching the last ReLU: a broadcast view, no NCHW copy
    assert torch.autograd.grad(GlobalAvgPool()(relu_in), relu_in, g)[0].stride()[2:] == (0, 0)
    fast = inference_copy(_trained_like("cnn", "fashion-mnist"), "cpu")
    assert any(isinstance(m, GlobalAvgPool) for m in fast.modules())
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in fast.modules())


def test_copy_folds_batchnorm_moves_relu_after_pool_and_freezes() -> None:
    model = _trained_like("cnn", "fashion-mnist")
    fast = inference_copy(model, "cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    kinds = [type(dict(fast.named_modules())[n.target]).__name__ for n in fast.graph.nodes if n.op == "call_module"]
    first_pool = kinds.index("MaxPool2d")
    assert kinds[first_pool - 1] == "Conv2d" and kinds[first_pool + 1] == "ReLU"
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    # the caller's model is untouched: still training, trainable, BatchNorm in place
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_untraceable_model_is_used_as_a_frozen_copy() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.lin(x)
            return -self.lin(x)

    model = Branchy()
    fast = inference_copy(model, "cpu")
    x = torch.rand(2, 4)
    assert type(fast) is Branchy and torch.equal(fast(x), model(x))
    assert not any(p.requires_grad for p in fast.parameters()) and model.lin.weight.requires_grad


def test_eval_batch_size_defaults() -> None:
    assert eval_batch_size("cpu") == 128 and eval_batch_size("cuda") == 256 and eval_batch_size("cpu", 40) == 40


def test_matrix_on_copies_agrees_with_torchattacks_on_the_models(digits_runs) -> None:
    """The whole matrix, crafted on evaluation copies, against a torchattacks loop on the originals."""
    store, ids = digits_runs
    models = deflect.load_set(ids["independent"], store)  # independent models: transfer is partial
    data = select_subset(deflect.load_dataset("digits", "test"), 128)
    x, y = data.batch(torch.arange(len(data)))
    attack = make_attack("pgd1", "digits")
    p = attack.params()
    res = transfer_matrix(models, data, attack, batch_size=128, seed=5, workers=2)
    expected = []
    for s, src in enumerate(models):
        torch.manual_seed(task_seed(5, 0, s))  # each (batch, source) task draws its own random start
        adv = torchattacks.PGD(src, eps=p["eps"], alpha=p["alpha"], steps=p["steps"])(x, y)
        with torch.no_grad():
            expected.append([100.0 * (t(adv).argmax(1) == y).float().mean().item() for t in models])
    off = [expected[s][t] for s in range(3) for t in range(3) if s != t]
    assert min(off) > 5 and max(off) < 95  # a matrix with room to disagree
    # same random starts, crafted on two threads; only float rounding differs: at most 2 images
    assert np.abs(np.array(res.matrix) - np.array(expected)).max() <= 100.0 * 2 / 128


@pytest.mark.parametrize("attack_name", ["pgd1", "mifgsm1", "di-ti-mifgsm"])
def test_matrix_does_not_depend_on_the_number_of_crafting_threads(digits_runs, attack_name: str) -> None:
    """Seeded per (batch, source) task, a matrix is the same crafted in order or on two threads,
    and a different seed draws different random starts."""
    store, ids = digits_runs
    models = deflect.load_set(ids["independent"], store)
    data = select_subset(deflect.load_dataset("digits", "test"), 160)
    before = torch.get_num_threads()
    one = transfer_matrix(models, data, attack_name, dataset="digits", batch_size=32, seed=3, workers=1)
    two = transfer_matrix(models, data, attack_name, dataset="digits", batch_size=32, seed=3, workers=2)
    assert torch.get_num_threads() == before  # the crafting threads hand the thread count back
    assert np.abs(np.array(one.matrix) - np.array(two.matrix)).max() <= 100.0 * 1 / 160
    assert one.clean == two.clean and one.n_examples == two.n_examples == 160
    if attack_name == "pgd1":
        other = transfer_matrix(models, data, attack_name, dataset="digits", batch_size=32, seed=4, workers=2)
        assert other.matrix != two.matrix


def test_an_attack_with_its_own_generator_is_not_reseeded() -> None:
    from deflect.attacks import MIFGSM, PGD

    gen = torch.Generator()
    assert PGD(eps=0.1, generator=gen).seeded(1, "cpu") is None  # the caller's stream, used in order
    a, b = PGD(eps=0.1).seeded(1, "cpu"), PGD(eps=0.1).seeded(1, "cpu")
    assert torch.equal(torch.rand(4, generator=a.generator), torch.rand(4, generator=b.generator))
    m = MIFGSM(eps=0.1)
    assert m.seeded(1, "cpu") is m  # nothing random: the same attack


def test_a_copy_is_not_copied_again_and_a_sweep_copies_once(monkeypatch) -> None:
    import deflect.evaluate as evaluate
    from deflect.evaluate import eps_sweep
    from deflect.inference import is_inference_copy

    models = [_trained_like("cnn", "digits", width=4).eval() for _ in range(2)]
    copy_ = inference_copy(models[0], "cpu")
    assert is_inference_copy(copy_) and not is_inference_copy(models[0])
    assert inference_copy(copy_, "cpu") is copy_
    built = []

    def counting(model, device):
        if not is_inference_copy(model):
            built.append(model)
        return inference_copy(model, device)

    monkeypatch.setattr(evaluate, "inference_copy", counting)
    data = select_subset(deflect.load_dataset("digits", "test"), 16)
    results = eps_sweep(models, data, [0.05, 0.1, 0.2], steps=2, dataset="digits", device="cpu")
    assert len(results) == 3 and len(built) == 2  # one copy per model for the whole sweep
    # a larger budget fools at least as many images (same seed, same start direction)
    assert results[2].blackbox_mean <= results[0].blackbox_mean + 1e-9


def test_an_error_on_a_crafting_thread_reaches_the_caller_and_restores_the_threads() -> None:
    from dataclasses import dataclass, field

    from deflect.attacks import Attack
    from deflect.errors import DeflectError

    @dataclass(frozen=True)
    class Broken(Attack):
        deterministic = True
        name: str = field(default="broken", kw_only=True)

        def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            raise DeflectError("broken attack")

    models = [_trained_like("cnn", "digits", width=4).eval() for _ in range(2)]
    data = select_subset(deflect.load_dataset("digits", "test"), 64)
    before = torch.get_num_threads()
    with pytest.raises(DeflectError, match="broken attack"):
        transfer_matrix(models, data, Broken(), batch_size=16, workers=2)
    assert torch.get_num_threads() == before


needs_bf16 = pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16")


@needs_bf16
def test_bf16_crafting_gives_float32_logits_and_a_close_input_gradient() -> None:
    model = inference_copy(_trained_like("cnn", "fashion-mnist", width=16).eval(), "cpu")
    wrapped = bf16_crafting(model, "cpu")
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    assert wrapped(x).dtype == torch.float32
    g32, g16 = _input_grad(model, x, y), _input_grad(wrapped, x, y)
    assert F.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.98
    assert (g32.sign() == g16.sign()).float().mean() > 0.9  # what a PGD step uses


@needs_bf16
def test_bf16_matrix_is_close_to_float32_and_scored_in_float32(digits_runs) -> None:
    store, ids = digits_runs
    models = deflect.load_set(ids["independent"], store)
    data = select_subset(deflect.load_dataset("digits", "test"), 256)
    full = transfer_matrix(models, data, "pgd1", dataset="digits", seed=2)
    half = transfer_matrix(models, data, "pgd1", dataset="digits", seed=2, bf16=True)
    assert half.clean == full.clean  # scoring never runs in bf16
    assert half.params == {**full.params, "precision": "bf16"} and "precision" not in full.params
    diff = np.abs(np.array(half.matrix) - np.array(full.matrix))
    assert diff.max() <= 8.0 and abs(half.blackbox_mean - full.blackbox_mean) <= 3.0
    assert 5 < full.blackbox_mean < 95  # room to disagree


def test_bf16_is_refused_where_it_is_not_native(monkeypatch, digits_runs) -> None:
    import deflect.inference as inference
    from deflect.errors import DeflectError

    monkeypatch.setattr(inference, "bf16_supported", lambda device: False)
    store, ids = digits_runs
    models = deflect.load_set(ids["independent"], store)
    data = select_subset(deflect.load_dataset("digits", "test"), 32)
    with pytest.raises(DeflectError, match="native bf16"):
        transfer_matrix(models, data, "fgsm", dataset="digits", bf16=True)
    before = len(store.evaluations(ids["independent"]))
    result = CliRunner().invoke(app, ["evaluate", ids["independent"], "--attack", "fgsm", "--bf16",
                                      "--limit", "32", "--db", str(store.path)])
    assert result.exit_code == 2 and "native bf16" in result.output and "Traceback" not in result.output
    assert len(store.evaluations(ids["independent"])) == before


@needs_bf16
def test_cli_bf16_evaluation_is_recorded_and_not_reused_by_a_reproduction(digits_runs) -> None:
    from deflect.reproduce import _has, make_plan

    store, ids = digits_runs
    run = store.get_run(ids["disjoint"])
    result = CliRunner().invoke(app, ["evaluate", run.id, "--attack", "pgd1", "--bf16", "--limit", "48",
                                      "--db", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    (ev,) = json.loads(result.stdout.strip().splitlines()[-1])["evaluations"]
    assert ev["params"]["precision"] == "bf16"
    assert store.evaluations(run.id)[-1].params["precision"] == "bf16"
    plan = make_plan("digits", quick=True)
    assert _has(store, plan, run, "transfer", "pgd1", 48) is None  # a float32 plan crafts its own
