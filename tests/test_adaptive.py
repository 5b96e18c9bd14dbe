"""Adaptive attacks: DI/TI transforms, DI-TI-MI-FGSM, Square, the surrogate attacker and `evaluate --adaptive`.

Models are tiny (a plain digits CNN trained in a second or two, and a tiny 3-model digits run), images
few and steps short, so the whole file runs in well under a minute on one CPU thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from deflect.attacks import (
    DiTiMIFGSM,
    Square,
    adaptive_attack_names,
    attack_names,
    gaussian_kernel,
    input_diversity,
    make_attack,
    smooth_gradient,
)
from deflect.cli import app
from deflect.data import load_dataset
from deflect.errors import DeflectError
from deflect.store import Store
from deflect.surrogate import LabelOracle, QueryBudget, steal_labels, train_surrogate
from tests.conftest import tiny_config

EPS = 0.15  # digits' preset L∞ budget


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    test = load_dataset("digits", "test")
    return test.batch(torch.arange(64))


@pytest.fixture(scope="module")
def plain_model() -> nn.Module:
    """An undefended digits CNN (about 97 % on test), trained on true labels with the surrogate's loop."""
    train = load_dataset("digits", "train")
    x, y = train.batch(torch.arange(len(train)))
    return train_surrogate(x, y, tiny_config(width=16), epochs=4, seed=0)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# DI / TI -------------------------------------------------------------------------------------------
def test_input_diversity_keeps_images_in_unit_box_and_equals_resize_then_pad() -> None:
    x = torch.rand(32, 1, 8, 8)
    x[:, :, :2] = 1.0  # saturated pixels must not overshoot after interpolation
    out = input_diversity(x, 1.0, 0.75, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    # the same draws, done the textbook way: bilinear resize to s×s, zero-pad at (top, left)
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(6, 9, (32,), generator=g)
    tops = torch.floor(torch.rand(32, generator=g) * (9 - sizes)).long()
    lefts = torch.floor(torch.rand(32, generator=g) * (9 - sizes)).long()
    for i in range(32):
        s, t, left = int(sizes[i]), int(tops[i]), int(lefts[i])
        ref = F.pad(F.interpolate(x[i:i + 1], size=[s, s], mode="bilinear", align_corners=False),
                    [left, 8 - s - left, t, 8 - s - t])
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)
    assert torch.equal(input_diversity(x, 0.0, 0.75), x)
    half = input_diversity(x, 0.5, 0.75, torch.Generator().manual_seed(3))
    changed = (half != x).flatten(1).any(1).float().mean()
    assert 0.2 < float(changed) < 0.8  # roughly half the images transformed


def test_translation_invariance_kernel_and_smoothing() -> None:
    k = gaussian_kernel(3, 0.75)
    assert float(k.sum()) == pytest.approx(1.0) and torch.equal(k, k.T) and torch.equal(k, k.flip(0))
    assert float(k[1, 1]) == pytest.approx(float(k.max()))
    grad = torch.zeros(1, 1, 8, 8)
    grad[0, 0, 4, 4] = 1.0
    smoothed = smooth_gradient(grad, 3, 0.75)
    assert torch.allclose(smoothed[0, 0, 3:6, 3:6], k)  # an impulse spreads into the kernel itself
    assert torch.equal(smooth_gradient(grad, 1, 0.75), grad)


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_di_ti_mifgsm_respects_budget_and_box_on_a_model_and_an_ensemble(
        plain_model: nn.Module, digits_batch: tuple[torch.Tensor, torch.Tensor], loss: str) -> None:
    x, y = digits_batch
    attack = DiTiMIFGSM(eps=EPS, alpha=EPS / 5, steps=8, restarts=2, loss=loss, ti_size=3, ti_sigma=0.75,
                        diversity_prob=0.5, min_scale=0.75)
    for source in (plain_model, [plain_model, plain_model]):
        x_adv = attack(source, x, y)
        assert float((x_adv - x).abs().max()) <= EPS + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert _accuracy(plain_model, x, y) > 0.9 and _accuracy(plain_model, x_adv, y) < 0.35


def test_di_ti_mifgsm_without_di_ti_and_restarts_is_torchattacks_mifgsm(
        plain_model: nn.Module, digits_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """DI off, TI kernel 1, one run from x: exactly MI-FGSM, momentum included (oracle: torchattacks)."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits_batch
    ours = DiTiMIFGSM(eps=EPS, alpha=EPS / 10, steps=10, decay=1.0, restarts=1, diversity_prob=0.0, ti_size=1)
    torch.manual_seed(7)
    a = ours(plain_model, x, y)
    torch.manual_seed(7)
    b = torchattacks.MIFGSM(plain_model, eps=EPS, alpha=EPS / 10, steps=10, decay=1.0)(x, y)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # the oracle can tell momentum from none: plain iterative FGSM (decay 0) lands elsewhere
    no_momentum = torchattacks.MIFGSM(plain_model, eps=EPS, alpha=EPS / 10, steps=10, decay=0.0)(x, y)
    assert float((no_momentum - b).abs().max()) > EPS / 2


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return g


def test_di_ti_mifgsm_one_step_smooths_the_gradient_with_a_gaussian(
        plain_model: nn.Module, digits_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One step with TI: x' = clip(x + α·sign(g ∗ G)), G the normalised 5×5 Gaussian of σ = 1."""
    x, y = digits_batch
    alpha = 0.05
    out = DiTiMIFGSM(eps=EPS, alpha=alpha, steps=1, restarts=1, diversity_prob=0.0, ti_size=5,
                     ti_sigma=1.0)(plain_model, x, y)
    r = torch.arange(5, dtype=torch.float32) - 2
    kernel = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / 2)
    kernel = (kernel / kernel.sum()).view(1, 1, 5, 5)
    g = _input_grad(plain_model, x, y)
    smoothed = F.conv2d(g, kernel.expand(x.shape[1], 1, 5, 5), padding=2, groups=x.shape[1])
    expected = torch.clamp(x + alpha * smoothed.sign(), 0.0, 1.0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    unsmoothed = torch.clamp(x + alpha * g.sign(), 0.0, 1.0)
    assert float((unsmoothed != expected).float().mean()) > 0.05  # TI changes many pixels' direction


def test_di_ti_mifgsm_input_diversity_takes_the_gradient_at_the_transformed_image(
        plain_model: nn.Module, digits_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """DI on (p = 1) changes the result, and one step is sign(∇ loss(model(DI(x)))) with the same draws."""
    x, y = digits_batch
    alpha = 0.05

    def one_step(prob: float) -> torch.Tensor:
        attack = DiTiMIFGSM(eps=EPS, alpha=alpha, steps=1, restarts=1, diversity_prob=prob, min_scale=0.75,
                            ti_size=1, generator=torch.Generator().manual_seed(11))
        return attack(plain_model, x, y)

    with_di, without = one_step(1.0), one_step(0.0)
    assert float((with_di != without).float().mean()) > 0.05
    xv = x.clone().requires_grad_(True)
    moved = input_diversity(xv, 1.0, 0.75, torch.Generator().manual_seed(11))
    (g,) = torch.autograd.grad(F.cross_entropy(plain_model(moved), y, reduction="sum"), xv)
    torch.testing.assert_close(with_di, torch.clamp(x + alpha * g.sign(), 0.0, 1.0), atol=1e-6, rtol=0)
    several = DiTiMIFGSM(eps=EPS, alpha=EPS / 5, steps=5, restarts=1, ti_size=1, diversity_prob=1.0, min_scale=0.75)
    plain = DiTiMIFGSM(eps=EPS, alpha=EPS / 5, steps=5, restarts=1, ti_size=1, diversity_prob=0.0)
    assert not torch.equal(several(plain_model, x, y), plain(plain_model, x, y))


def test_restarts_keep_the_higher_loss_per_image(plain_model: nn.Module,
                                                 digits_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits_batch
    one = DiTiMIFGSM(eps=0.05, alpha=0.01, steps=3, restarts=1, loss="cw")
    four = DiTiMIFGSM(eps=0.05, alpha=0.01, steps=3, restarts=4, loss="cw")
    torch.manual_seed(0)
    first = one(plain_model, x, y)
    torch.manual_seed(0)
    best = four(plain_model, x, y)  # same first run (same seed), then three random restarts
    with torch.no_grad():
        s1, s4 = one._score(plain_model, first, y), four._score(plain_model, best, y)
    assert bool((s4 >= s1 - 1e-5).all()) and float(s4.mean()) > float(s1.mean())


def test_registry_builds_adaptive_attacks_beside_table1() -> None:
    assert len(attack_names()) == 11 and "square" not in attack_names()
    assert adaptive_attack_names() == ["di-ti-mifgsm", "di-ti-mifgsm-cw", "di-ti-mifgsm-2eps",
                                       "di-ti-mifgsm-cw-2eps", "square"]
    a = make_attack("di-ti-mifgsm-cw-2eps", "digits")
    assert isinstance(a, DiTiMIFGSM) and a.eps == pytest.approx(2 * EPS) and a.alpha == pytest.approx(2 * EPS / 20)
    assert (a.loss, a.ti_size, a.ti_sigma, a.steps, a.restarts) == ("cw", 3, 0.75, 50, 3)
    assert make_attack("di-ti-mifgsm", "fashion-mnist").ti_size == 5  # type: ignore[attr-defined]
    sq = make_attack("square", "fashion-mnist", max_queries=10)
    assert isinstance(sq, Square) and sq.eps == pytest.approx(0.1) and sq.max_queries == 10
    with pytest.raises(DeflectError, match=r"'mi-di'.*ead2.*square"):
        make_attack("mi-di")
    with pytest.raises(DeflectError, match="ti_size"):
        make_attack("di-ti-mifgsm", ti_size=4)
    with pytest.raises(DeflectError, match="loss"):
        make_attack("di-ti-mifgsm", loss="hinge")


# Square ----------------------------------------------------------------------------------------------
def test_square_respects_budget_and_query_limit_and_breaks_an_undefended_model(
        plain_model: nn.Module, digits_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits_batch
    correct = plain_model(x).argmax(1) == y
    res = Square(eps=EPS, max_queries=300, seed=0).run(plain_model, x, y)
    assert float((res.x_adv - x).abs().max()) <= EPS + 1e-6
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert int(res.queries.min()) >= 1 and int(res.queries.max()) <= 300
    with torch.no_grad():
        fooled = plain_model(res.x_adv).argmax(1) != y
    assert torch.equal(fooled, res.success)  # success is what the victim answers
    assert float(res.success[correct].float().mean()) >= 0.9  # it must work, or the attack is broken
    assert bool((res.queries[~res.success] == 300).all())  # failures used the whole budget, successes stopped
    assert float(res.queries[res.success & correct].float().median()) < 300
    # a budget of one query is the initial stripes alone
    assert bool((Square(eps=EPS, max_queries=1).run(plain_model, x, y).queries == 1).all())


def test_square_matches_torchattacks_success(plain_model: nn.Module,
                                             digits_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits_batch
    clean = _accuracy(plain_model, x, y)
    ours = Square(eps=EPS, max_queries=300, seed=0)(plain_model, x, y)
    theirs = torchattacks.Square(plain_model, eps=EPS, n_queries=300, seed=0)(x, y)
    a, b = _accuracy(plain_model, ours, y), _accuracy(plain_model, theirs, y)
    assert clean - a >= 0.5 and clean - b >= 0.5, (clean, a, b)  # both must bite, or agreement means nothing
    assert abs(a - b) <= 0.1, (a, b)


# the surrogate attacker --------------------------------------------------------------------------
def test_surrogate_never_queries_beyond_its_budget(plain_model: nn.Module) -> None:
    pool = load_dataset("digits", "val")  # 180 images
    budget = QueryBudget(50)
    x, labels = steal_labels(LabelOracle(plain_model, budget, batch_size=16), pool, 0, torch.device("cpu"))
    assert budget.used == len(x) == 50 <= budget.budget
    assert torch.equal(labels, plain_model(x).argmax(1))  # the client's answers, not the true labels
    with pytest.raises(DeflectError, match="exceed the budget of 50"):
        LabelOracle(plain_model, budget)(x[:1])
    assert budget.used == 50
    big = QueryBudget(10_000)  # more budget than images: each image is queried once
    steal_labels(LabelOracle(plain_model, big), pool, 0, torch.device("cpu"))
    assert big.used == len(pool) < big.budget
    with pytest.raises(DeflectError, match="at least 1"):
        QueryBudget(0)


# evaluate --adaptive ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from deflect.train import train

    db = tmp_path_factory.mktemp("adaptive") / "deflect.db"
    return db, train(tiny_config(n=3), Store(db))


def test_cli_evaluate_adaptive_json(tiny_run: tuple[Path, str]) -> None:
    db, run_id = tiny_run
    args = ["evaluate", run_id, "--adaptive", "--json", "--db", str(db), "--limit", "24", "--steps", "2",
            "--restarts", "1", "--queries", "64", "--max-queries", "40", "--square-limit", "12"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["run"] == run_id and out["kind"] == "adaptive" and out["settings"]["k"] is None
    rows = {(r["family"], r["attack"], r["source"]): r for r in out["rows"]}
    owned = out["settings"]["owned"]
    assert len(owned) == 2 and len(out["rows"]) == len(out["table"]) == 1 + 4 * 2 + 2 + 2 + 1
    for r in out["rows"]:
        assert all(0.0 <= a <= 100.0 for a in r["accuracy"]) and len(r["accuracy"]) == 3
        assert r["deployed_acc"] == pytest.approx(sum(r["accuracy"]) / 3)
        unowned = [a for i, a in enumerate(r["accuracy"]) if i not in r["owned"]]
        assert r["unowned_acc"] == pytest.approx(sum(unowned) / len(unowned))
    ensemble = [r for r in out["rows"] if r["family"] == "transfer" and r["k"] == 2]
    assert len(ensemble) == 4 and all(r["owned"] == owned for r in ensemble)
    assert sorted({round(r["eps"], 6) for r in ensemble}) == pytest.approx([EPS, 2 * EPS])
    surrogate = [r for r in out["rows"] if r["family"] == "surrogate"]
    assert all(r["cost"]["queries"] <= 64 and r["k"] == 0 and r["target"] is not None for r in surrogate)
    square = next(r for r in out["rows"] if r["family"] == "query")
    assert square["n_examples"] == 12 and square["cost"]["max_queries"] == 40
    assert square["cost"]["total_queries"] <= 12 * 40
    assert square["target_acc"] == square["accuracy"][square["target"]]
    aware = [r for r in out["rows"] if r["family"] == "method-aware"]
    assert len(aware) == 2 and aware[0]["cost"]["trained_now"] is True
    assert len(rows) == len(out["rows"])  # every (attacker, attack, source) appears once

    store = Store(db)
    stored = store.evaluations(run_id, kind="adaptive")
    assert [e.id for e in stored] == [r["evaluation_id"] for r in out["rows"]]
    sq = next(e for e in stored if e.attack == "square")
    assert sq.params["budget"] == 40 and sq.extra["cost"]["images"] == 12 and len(sq.matrix[0]) == 3
    assert store.get_run("latest").id == run_id  # the method-aware attacker's own set is a helper run

    again = CliRunner().invoke(app, [*args[:2], "--adaptive", "--json", "--db", str(db), "--limit", "8",
                                     "--attackers", "method-aware"])
    assert again.exit_code == 0, again.output
    cached = json.loads(again.stdout)["rows"]
    assert [r["family"] for r in cached] == ["method-aware"] * 2 and cached[0]["cost"]["trained_now"] is False


def test_cli_evaluate_adaptive_errors(tiny_run: tuple[Path, str]) -> None:
    db, run_id = tiny_run
    for extra, needle in ((["--k", "3"], "--k must be between 1 and 2 (the attacker lacks at least one"),
                          (["--attackers", "oracle"], "unknown adaptive attacker oracle"),
                          (["--queries", "0"], "--queries must be at least 1"),
                          (["--attack", "pgd1"], "--adaptive runs on its own")):
        result = CliRunner().invoke(app, ["evaluate", run_id, "--adaptive", "--db", str(db), *extra])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
