"""Tests for deflect.attacks on a tiny CNN trained in seconds on scikit-learn's 8×8 digits.

torchattacks serves as the oracle: the L∞/L2 gradient attacks must agree with it exactly for
the same seed; CW/EAD (which deliberately fix some torchattacks quirks) must agree on success
rate and not be worse on distortion.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deflect.attacks import (
    CW,
    DATASET_BUDGETS,
    EAD,
    FGM,
    FGSM,
    MIFGSM,
    PGD,
    RFGSM,
    Ensemble,
    attack_names,
    default_params,
    eval_mode,
    make_attack,
    pgd_sweep_attack,
)
from deflect.errors import DeflectError

torchattacks = pytest.importorskip("torchattacks")

TABLE1 = [
    "fgsm",
    "fgm",
    "rfgsm",
    "pgd1",
    "pgd2",
    "mifgsm1",
    "mifgsm2",
    "cw1",
    "cw2",
    "ead1",
    "ead2",
]
LINF_ATTACKS = {"fgsm", "rfgsm", "pgd1", "pgd2", "mifgsm1", "mifgsm2"}
FAST = {"steps": 100}  # CW/EAD iterations in tests (Table 1 uses 1000)
N_ATTACK = 200  # test images attacked


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 10),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _train(model: nn.Module, x: Tensor, y: Tensor, epochs: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    return model


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def digits() -> dict[str, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"x_train": x[:1400], "y_train": y[:1400], "x_test": x[1400:], "y_test": y[1400:]}


@pytest.fixture(scope="module")
def model(digits: dict[str, Tensor]) -> nn.Module:
    torch.manual_seed(0)
    m = _train(_cnn(), digits["x_train"], digits["y_train"], epochs=12)
    assert _accuracy(m, digits["x_test"], digits["y_test"]) >= 0.9
    return m


@pytest.fixture(scope="module")
def model2(digits: dict[str, Tensor]) -> nn.Module:
    torch.manual_seed(1)
    m = _train(_mlp(), digits["x_train"], digits["y_train"], epochs=15)
    assert _accuracy(m, digits["x_test"], digits["y_test"]) >= 0.9
    return m


@pytest.fixture(scope="module")
def batch(digits: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return digits["x_test"][:N_ATTACK], digits["y_test"][:N_ATTACK]


def _attack(name: str, dataset: str = "digits", **kw: object):
    extra = FAST if name[:2] in ("cw", "ea") else {}
    return make_attack(name, dataset, **{**extra, **kw})


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", TABLE1)
def test_attack_contract(name: str, model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    x_before = x.clone()
    atk = _attack(name)
    model.train()
    try:
        x_adv = atk(model, x, y)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if name in LINF_ATTACKS:
        assert delta.abs().max() <= atk.eps + 1e-6
        assert delta.abs().max() >= 0.5 * atk.eps  # it did move
    elif name == "fgm":
        assert delta.norm(dim=1).max() <= atk.eps + 1e-5
        assert delta.norm(dim=1).max() >= 0.5 * atk.eps
    assert atk.name == name
    assert json.loads(json.dumps(atk.params())) == atk.params()
    assert type(atk).__name__ in repr(atk)


def test_attacks_work_under_no_grad(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    with torch.no_grad():
        x_adv = _attack("pgd1")(model, x, y)
    assert _accuracy(model, x_adv, y) < _accuracy(model, x, y)


def test_eval_mode_restores_mixed_states(model2: nn.Module) -> None:
    model2.train()
    model2[1].eval()
    with eval_mode(model2):
        assert not any(m.training for m in model2.modules())
    assert model2.training and not model2[1].training and model2[3].training
    model2.eval()


def test_bad_inputs_raise(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    with pytest.raises(DeflectError, match="0, 1"):
        FGSM()(model, x * 2, y)
    with pytest.raises(DeflectError, match="labels"):
        FGSM()(model, x, y[:-1])
    with pytest.raises(DeflectError):
        FGSM()(model, [], y)  # type: ignore[arg-type]
    with pytest.raises(DeflectError):
        Ensemble([])


# --------------------------------------------------------------------------- oracle


def _both(ours, theirs, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    torch.manual_seed(123)
    a = ours(model, x, y)
    torch.manual_seed(123)
    b = theirs(x, y)
    model.zero_grad(set_to_none=True)  # torchattacks' CW/EAD call .backward() into the model
    return a, b


@pytest.mark.parametrize(
    ("ours", "make_theirs"),
    [
        (FGSM(eps=0.15), lambda m: torchattacks.FGSM(m, eps=0.15)),
        (
            FGM(eps=0.7),
            lambda m: torchattacks.PGDL2(m, eps=0.7, alpha=0.7, steps=1, random_start=False),
        ),
        (RFGSM(eps=0.15), lambda m: torchattacks.RFGSM(m, eps=0.15, alpha=0.075, steps=1)),
        (
            PGD(eps=0.15, alpha=0.04, steps=7),
            lambda m: torchattacks.PGD(m, eps=0.15, alpha=0.04, steps=7, random_start=True),
        ),
        (
            MIFGSM(eps=0.15, alpha=0.015, steps=10, decay=1.0),
            lambda m: torchattacks.MIFGSM(m, eps=0.15, alpha=0.015, steps=10, decay=1.0),
        ),
    ],
    ids=["fgsm", "fgm", "rfgsm", "pgd", "mifgsm"],
)
def test_matches_torchattacks(ours, make_theirs, model: nn.Module, batch) -> None:
    x, y = batch
    a, b = _both(ours, make_theirs(model), model, x, y)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.equal(a, x)


def _success_and_dist(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor):
    with torch.no_grad():
        ok = model(x_adv).argmax(1) != y
    d = (x_adv - x).flatten(1)
    return ok.float().mean().item(), d.norm(dim=1)[ok].mean().item(), d.abs().sum(1)[ok].mean()


def test_cw_agrees_with_torchattacks(model: nn.Module, batch) -> None:
    x, y = batch
    a, b = _both(
        CW(c=1.0, kappa=0.0, steps=100, unfooled="clean"),
        torchattacks.CW(model, c=1, kappa=0, steps=100),
        model,
        x,
        y,
    )
    sa, l2a, _ = _success_and_dist(model, x, a, y)
    sb, l2b, _ = _success_and_dist(model, x, b, y)
    assert sa >= 0.8
    assert abs(sa - sb) <= 0.05
    assert l2a == pytest.approx(l2b, rel=0.1)


def _eaden(model: nn.Module, c: float, steps: int):
    return torchattacks.EADEN(
        model,
        kappa=0,
        lr=0.01,
        binary_search_steps=1,
        max_iterations=steps,
        initial_const=c,
        beta=0.01,
    )


def test_ead_agrees_with_torchattacks(model: nn.Module, batch) -> None:
    x, y = batch
    a, b = _both(
        EAD(c=20.0, kappa=0.0, beta=0.01, steps=100, unfooled="clean"), _eaden(model, 20.0, 100), model, x, y
    )
    sa, _, l1a = _success_and_dist(model, x, a, y)
    sb, _, l1b = _success_and_dist(model, x, b, y)
    assert sa >= 0.9
    assert abs(sa - sb) <= 0.05
    # torchattacks measures distance from an input shifted by its first step (see below), so
    # it can only come out larger; ours must not be worse.
    assert l1a <= 1.05 * l1b


@pytest.mark.parametrize("c", [20.0, 10.0])
def test_ead_equals_torchattacks_without_its_aliasing_bug(
    c: float, model: nn.Module, batch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchattacks' ``nn.Parameter(images)`` shares storage with its reference image, so its
    first gradient step also moves the reference. With that copy made, it must equal ours."""
    from types import SimpleNamespace

    import torchattacks.attacks.eaden as eaden

    fixed_nn = SimpleNamespace(
        Parameter=lambda t: nn.Parameter(t.clone()), Flatten=nn.Flatten, MSELoss=nn.MSELoss
    )
    monkeypatch.setattr(eaden, "nn", fixed_nn)
    x, y = batch
    a, b = _both(EAD(c=c, kappa=0.0, beta=0.01, steps=50, unfooled="clean"), _eaden(model, c, 50), model, x, y)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert _accuracy(model, a, y) <= 0.1


@pytest.mark.parametrize(
    "atk", [CW(c=1.0, kappa=2.0, steps=100, unfooled="clean"), EAD(c=10.0, kappa=2.0, steps=100, unfooled="clean")],
    ids=["cw", "ead"],
)
def test_cw_ead_keep_clean_failures_and_respect_margin(atk, model: nn.Module, batch) -> None:
    x, y = batch
    x_adv = atk(model, x, y)
    with torch.no_grad():
        z = model(x_adv)
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, 10).bool(), -math.inf).amax(1)
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.float().mean() >= 0.5
    assert (other[changed] - true[changed] >= atk.kappa - 1e-4).all()
    assert torch.equal(x_adv[~changed], x[~changed])


@pytest.mark.parametrize("cls", [CW, EAD], ids=["cw", "ead"])
def test_cw_ead_return_the_last_iterate_of_samples_never_fooled(cls, model: nn.Module, batch) -> None:
    """Table 1's high-κ settings rarely reach their margin with one constant c: as in the paper's
    released code, such a sample comes back as the last iterate, which still moves the model;
    samples fooled with the margin keep their best iterate either way."""
    x, y = batch
    atk = cls(c=1.0, kappa=40.0, steps=60, early_stop=False)
    last = atk(model, x, y)
    clean = dataclasses.replace(atk, unfooled="clean")(model, x, y)
    with torch.no_grad():
        z = model(clean)
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, 10).bool(), -math.inf).amax(1)
    reached = (clean != x).flatten(1).any(1)
    assert (other[reached] - true[reached] >= 40.0 - 1e-4).all()
    assert (~reached).float().mean() >= 0.5  # the margin is out of reach for most samples
    assert torch.equal(last[reached], clean[reached])
    assert (last[~reached] != x[~reached]).flatten(1).any(1).all()
    assert float(last.min()) >= 0.0 and float(last.max()) <= 1.0
    # the last iterates lower the model's margin on its true class: an attack, not the clean image
    assert _accuracy(model, last, y) < _accuracy(model, clean, y) - 0.3


def test_cw_early_stop_returns_the_iterate_it_stopped_at(model: nn.Module, batch) -> None:
    """With c = 0 nothing is fooled and the cost (the distance alone) rises from the first step: the
    check at step 5 stops, and the released code returns that step's iterate, the one five updates
    make without stopping."""
    x, y = batch
    stopped = CW(c=0.0, lr=0.1, steps=50, early_stop=True)(model, x, y)
    five = CW(c=0.0, lr=0.1, steps=5, early_stop=False)(model, x, y)
    assert (stopped != x).flatten(1).any(1).all()
    torch.testing.assert_close(stopped, five, atol=0, rtol=0)


def test_unfooled_is_checked() -> None:
    with pytest.raises(DeflectError, match="unfooled must be one of last, clean, got 'best'"):
        CW(unfooled="best")
    assert make_attack("cw2").params()["unfooled"] == "last"
    assert make_attack("ead2").params()["unfooled"] == "last"


def test_cw_margin_makes_it_harder(model: nn.Module, batch) -> None:
    x, y = batch
    weak = CW(c=1.0, kappa=0.0, steps=100)(model, x, y)
    strong = CW(c=1.0, kappa=5.0, steps=100)(model, x, y)
    l2_weak = _success_and_dist(model, x, weak, y)[1]
    l2_strong = _success_and_dist(model, x, strong, y)[1]
    assert l2_strong > l2_weak


# --------------------------------------------------------------------------- effect


def test_whitebox_pgd_breaks_the_model(model: nn.Module, batch) -> None:
    x, y = batch
    assert _accuracy(model, x, y) >= 0.9
    torch.manual_seed(0)
    x_adv = make_attack("pgd1", dataset="digits")(model, x, y)
    assert _accuracy(model, x_adv, y) <= 0.2


def test_stronger_pgd_is_not_weaker(model: nn.Module, batch) -> None:
    x, y = batch
    torch.manual_seed(0)
    weak = _accuracy(model, make_attack("pgd1", "digits", eps=0.05)(model, x, y), y)
    torch.manual_seed(0)
    strong = _accuracy(model, make_attack("pgd2", "digits")(model, x, y), y)
    assert strong < weak


# --------------------------------------------------------------------------- ensembles


def test_ensemble_of_one_equals_the_model(model: nn.Module, batch) -> None:
    x, y = batch
    atk = _attack("pgd1")
    torch.manual_seed(7)
    direct = atk(model, x, y)
    torch.manual_seed(7)
    via_list = atk([model], x, y)
    torch.manual_seed(7)
    via_module = atk(Ensemble([model]), x, y)
    assert torch.equal(direct, via_list) and torch.equal(direct, via_module)


def test_ensemble_averages_logits(model: nn.Module, model2: nn.Module, batch) -> None:
    x, y = batch
    ens = Ensemble([model, model2])
    with torch.no_grad():
        torch.testing.assert_close(ens(x), (model(x) + model2(x)) / 2)
    atk = _attack("pgd1")
    model2.train()
    torch.manual_seed(3)
    a = atk([model, model2], x, y)
    assert model2.training and not model.training
    model2.eval()
    torch.manual_seed(3)
    b = atk(ens, x, y)
    assert torch.equal(a, b)
    assert _accuracy(ens, a, y) <= 0.3
    assert all(p.grad is None for p in ens.parameters())


# --------------------------------------------------------------------------- options


def test_generator_gives_reproducible_starts(model: nn.Module, batch) -> None:
    x, y = batch
    runs = [
        PGD(eps=0.1, alpha=0.02, steps=2, generator=torch.Generator().manual_seed(5))(model, x, y)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    other = PGD(eps=0.1, alpha=0.02, steps=2, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(runs[0], other(model, x, y))
    assert "generator" not in PGD().params()


def test_fgm_per_channel_normalises_each_channel() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.full((6, 3, 4, 4), 0.5)
    y = torch.arange(6) % 5
    eps = 0.1
    per_channel = FGM(eps=eps, per_channel=True)(net, x, y) - x
    torch.testing.assert_close(
        per_channel.flatten(2).norm(dim=2), torch.full((6, 3), eps), atol=1e-5, rtol=0
    )
    whole = FGM(eps=eps)(net, x, y) - x
    torch.testing.assert_close(whole.flatten(1).norm(dim=1), torch.full((6,), eps))


def test_mifgsm_batch_l1_matches_per_sample_for_one_sample(model: nn.Module, batch) -> None:
    x, y = batch
    a = MIFGSM(eps=0.15, alpha=0.015, batch_l1=True)(model, x[:1], y[:1])
    b = MIFGSM(eps=0.15, alpha=0.015)(model, x[:1], y[:1])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x)


def test_cw_early_stop_is_optional(model: nn.Module, batch) -> None:
    # With c=0 the cost is just ‖δ‖², ~0 at the start; a huge first Adam step raises it, so
    # the rule (checked every step when steps < 20) must stop at the second check.
    x, y = batch
    calls = {}
    for early_stop in (True, False):
        counting = _Counting(model)
        CW(c=0.0, lr=1.0, steps=10, early_stop=early_stop)(counting, x[:8], y[:8])
        calls[early_stop] = counting.calls
    assert calls == {True: 2, False: 10}
    assert CW(early_stop=False).params()["early_stop"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TABLE1)
def test_runs_on_cuda(name: str, model: nn.Module, batch) -> None:
    import copy

    net = copy.deepcopy(model).cuda()
    x, y = (t.cuda() for t in batch)
    x_adv = _attack(name, steps=10) if name[:2] in ("cw", "ea") else _attack(name)
    out = x_adv(net, x, y)
    assert out.device == x.device and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    if name in LINF_ATTACKS:
        assert (out - x).abs().max() <= x_adv.eps + 1e-6
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert PGD(eps=0.1, alpha=0.02, steps=2, generator=gen)(net, x, y).is_cuda


# --------------------------------------------------------------------------- registry


def test_attack_names_in_table_order() -> None:
    assert attack_names() == TABLE1


def test_cifar_defaults_are_table1() -> None:
    assert default_params("fgsm") == {"eps": 0.031}
    assert default_params("fgm")["eps"] == 1.0
    assert default_params("rfgsm") == {"eps": 0.031, "alpha": 0.0155}
    assert default_params("pgd1") == {
        "eps": 0.031,
        "alpha": 0.0078,
        "steps": 7,
        "random_start": True,
    }
    assert default_params("pgd2")["steps"] == 20
    mi = default_params("mifgsm1")
    assert (mi["eps"], mi["alpha"], mi["decay"], mi["steps"]) == (0.031, 0.0031, 1.0, 10)
    assert default_params("mifgsm2")["steps"] == 20
    cw1, cw2 = default_params("cw1"), default_params("cw2")
    assert (cw1["c"], cw1["kappa"], cw1["steps"], cw1["lr"]) == (1.0, 0.0, 1000, 0.01)
    assert (cw2["c"], cw2["kappa"]) == (1.0, 40.0)
    ead1, ead2 = default_params("ead1"), default_params("ead2")
    assert (ead1["c"], ead1["kappa"], ead1["beta"], ead1["steps"]) == (20.0, 0.0, 0.01, 1000)
    assert (ead2["c"], ead2["kappa"], ead2["beta"]) == (10.0, 55.0, 0.01)


@pytest.mark.parametrize(
    ("dataset", "linf", "dims"),
    [
        ("digits", 0.15, 64),
        ("fashion-mnist", 0.1, 784),
        ("mnist", 0.1, 784),
        ("cifar10", 0.031, 3072),
    ],
)
def test_budget_scaling(dataset: str, linf: float, dims: int) -> None:
    scale = linf / 0.031
    assert DATASET_BUDGETS[dataset].input_dims == dims
    for name in ("fgsm", "rfgsm", "pgd1", "pgd2", "mifgsm1", "mifgsm2"):
        assert default_params(name, dataset)["eps"] == pytest.approx(linf)
    assert default_params("pgd1", dataset)["alpha"] == pytest.approx(0.0078 * scale)
    assert default_params("mifgsm2", dataset)["alpha"] == pytest.approx(0.0031 * scale)
    assert default_params("rfgsm", dataset)["alpha"] == pytest.approx(linf / 2)
    assert default_params("fgm", dataset)["eps"] == pytest.approx(scale * math.sqrt(dims / 3072))
    for name in ("cw1", "cw2", "ead1", "ead2"):
        assert default_params(name, dataset) == default_params(name)


def test_digits_fgm_budget_value() -> None:
    assert default_params("fgm", "digits")["eps"] == pytest.approx(0.6984, abs=1e-4)


def test_overrides_win() -> None:
    atk = make_attack("pgd1", dataset="digits", steps=50, eps=0.05)
    assert (atk.eps, atk.steps) == (0.05, 50)
    assert atk.alpha == pytest.approx(0.0078 * 0.15 / 0.031)
    assert make_attack("rfgsm", eps=0.1).params()["alpha"] == pytest.approx(0.05)
    assert make_attack("cw2", dataset="digits", kappa=3.0, steps=10).params()["kappa"] == 3.0
    sweep = pgd_sweep_attack(0.1)
    assert (sweep.eps, sweep.steps) == (0.1, 100)
    assert sweep.alpha == pytest.approx(0.0025)


def test_dataset_names_are_forgiving() -> None:
    assert make_attack("fgsm", "Fashion_MNIST").eps == pytest.approx(0.1)
    assert make_attack("fgsm", None).eps == 0.031


def test_registry_errors() -> None:
    with pytest.raises(DeflectError, match=r"'pgd3'.*pgd1.*ead2"):
        make_attack("pgd3")
    with pytest.raises(DeflectError, match=r"'svhn'.*digits"):
        make_attack("pgd1", dataset="svhn")
    with pytest.raises(DeflectError, match="epsilon"):
        make_attack("pgd1", epsilon=0.1)
    with pytest.raises(DeflectError, match="eps"):
        make_attack("fgsm", eps=-0.1)
    with pytest.raises(DeflectError, match="steps"):
        make_attack("pgd2", steps=0)
    with pytest.raises(DeflectError, match="steps"):
        make_attack("cw1", steps=0)
    with pytest.raises(DeflectError, match="alpha"):
        make_attack("rfgsm", alpha=0.5)
