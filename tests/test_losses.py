"""Loss terms against hand-computed values, and double backprop against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from deflect.config import TermWindow, make_config
from deflect.train.grow import growth_loss
from deflect.train.losses import (
    ActiveTerms,
    angular_loss,
    disjoint_loss,
    input_gradients,
)


def linear_model(weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0])).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(weight))
        model[1].bias.copy_(torch.tensor(bias))
    return model


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(softmax(z)[np.arange(len(y)), y]).mean())


def test_angular_loss_hand_values() -> None:
    g1 = torch.tensor([[[[1.0, 0.0]]]])  # 1 sample, 1 channel, 1x2
    assert angular_loss([g1, torch.tensor([[[[0.0, 3.0]]]])]).item() == pytest.approx(1.0)  # orthogonal
    assert angular_loss([g1, torch.tensor([[[[-2.0, 0.0]]]])]).item() == pytest.approx(0.0)  # opposite
    assert angular_loss([g1, torch.tensor([[[[5.0, 0.0]]]])]).item() == pytest.approx(2.0)  # aligned
    # Three models: mean over the three pairs (cos 1, 0, 0) + 1.
    g3 = torch.tensor([[[[0.0, 1.0]]]])
    assert angular_loss([g1, g1, g3]).item() == pytest.approx(1 + 1 / 3)


def test_angular_loss_channel_vs_sample() -> None:
    # Channel 0 aligned (cos 1), channel 1 opposite with a much larger norm.
    a = torch.tensor([[[[1.0, 0.0]], [[10.0, 0.0]]]])
    b = torch.tensor([[[[1.0, 0.0]], [[-10.0, 0.0]]]])
    assert angular_loss([a, b], "channel").item() == pytest.approx(1 + (1 - 1) / 2)
    flat_cos = (1 - 100) / (math.sqrt(101) * math.sqrt(101))
    assert angular_loss([a, b], "sample").item() == pytest.approx(1 + flat_cos, rel=1e-6)


def test_input_gradients_match_closed_form() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 2, 2))
    y = np.array([0, 2, 1, 2])
    weights = [rng.normal(size=(3, 4)) for _ in range(2)]
    biases = [rng.normal(size=3) for _ in range(2)]
    models = [linear_model(w, b) for w, b in zip(weights, biases, strict=True)]
    losses, grads = input_gradients(models, torch.tensor(x), torch.tensor(y), create_graph=False)
    xf = x.reshape(4, -1)
    onehot = np.eye(3)[y]
    for w, b, loss, g in zip(weights, biases, losses, grads, strict=True):
        z = xf @ w.T + b
        assert loss.item() == pytest.approx(ce(z, y))
        expected = ((softmax(z) - onehot) @ w / len(y)).reshape(x.shape)  # batch-mean CE
        np.testing.assert_allclose(g.numpy(), expected, rtol=1e-10)


def two_linear_models(seed: int, batch: int):
    """A random batch of 2×2 grey images, labels of 3 classes, and two linear models (weights kept)."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 1, 2, 2))
    y = rng.integers(0, 3, batch)
    w = [rng.normal(size=(3, 4)) * 2 for _ in range(2)]
    b = [rng.normal(size=3) for _ in range(2)]
    return x, y, w, b, [linear_model(wi, bi) for wi, bi in zip(w, b, strict=True)]


def by_hand(x: np.ndarray, y: np.ndarray, w: list, b: list):
    """Flattened images, each linear model's logits and batch-mean input gradient, and per-image
    cross-entropy, with numpy."""
    xf = x.reshape(len(x), -1)
    onehot = np.eye(3)[y]
    z = [xf @ wi.T + bi for wi, bi in zip(w, b, strict=True)]
    grads = [(softmax(zi) - onehot) @ wi / len(x) for zi, wi in zip(z, w, strict=True)]

    def per_image(logits: np.ndarray) -> np.ndarray:
        return -np.log(softmax(logits)[np.arange(len(x)), y])

    return xf, z, grads, per_image


def test_transfer_terms_hand_values() -> None:
    """L_transfer1/2 of Eqs. 3-4 for two linear models, computed by hand with numpy."""
    x, y, w, b, models = two_linear_models(1, 5)
    cfg = make_config(n=2, eps1=6.0, eps2=0.1, w_class=1.0, w_angle=0.3, w_transfer1=0.5, w_transfer2=0.7,
                      class_reduction="sum")
    parts = disjoint_loss(models, torch.tensor(x), torch.tensor(y), cfg, ActiveTerms(True, True, True))

    xf, z, grads, _ = by_hand(x, y, w, b)
    clean = [ce(zi, y) for zi in z]

    def increase(i: int, delta: np.ndarray) -> float:
        return max(ce((xf + delta) @ w[i].T + b[i], y) - clean[i], 0.0)

    t1 = np.mean([increase(0, 6.0 * grads[1]), increase(1, 6.0 * grads[0])])
    t2 = np.mean([increase(0, 0.1 * np.tanh(2e4 * grads[1])), increase(1, 0.1 * np.tanh(2e4 * grads[0]))])
    norms = np.linalg.norm(grads[0], axis=1) * np.linalg.norm(grads[1], axis=1)
    cos = np.mean(np.sum(grads[0] * grads[1], 1) / norms)
    assert parts.classification.item() == pytest.approx(sum(clean))
    assert parts.transfer1.item() == pytest.approx(t1, rel=1e-8)
    assert parts.transfer2.item() == pytest.approx(t2, rel=1e-8)
    assert parts.angle.item() == pytest.approx(cos + 1, rel=1e-8)  # one channel: per-channel = per-sample
    expected_total = sum(clean) + 0.3 * (cos + 1) + 0.5 * t1 + 0.7 * t2
    assert parts.total.item() == pytest.approx(expected_total, rel=1e-8)
    assert t1 > 0 and t2 > 0  # the check exercises the unclamped branch


@pytest.mark.parametrize("step", ["reference", "fast", "grow"])
def test_eps1_per_sample_scales_the_step_by_the_batch_size(step: str) -> None:
    """`eps1_per_sample`: transfer term 1 steps ε1·B·g_j (B the batch size) instead of ε1·g_j, by hand, in
    the joint loss, its fast layout and a grown model's (model 0 new, model 1 frozen: the same two pairs)."""
    from deflect.train.fast import fast_disjoint_loss

    x, y, w, b, models = two_linear_models(1, 5)
    active = ActiveTerms(False, True, False)

    def term1(per_sample: bool) -> float:
        cfg = make_config(n=2, eps1=1.5, w_angle=0.0, w_transfer2=0.0, eps1_per_sample=per_sample)
        xt, yt = torch.tensor(x), torch.tensor(y)
        if step == "grow":
            parts = growth_loss(models[0], models[1:], xt, yt, cfg, active)
        elif step == "fast":
            parts = fast_disjoint_loss(models, xt, yt, cfg, active)
        else:
            parts = disjoint_loss(models, xt, yt, cfg, active)
        return parts.transfer1.item()

    xf, z, grads, _ = by_hand(x, y, w, b)
    clean = [ce(zi, y) for zi in z]

    def t1(step_size: float) -> float:
        rises = [ce((xf + step_size * grads[1 - i]) @ w[i].T + b[i], y) - clean[i] for i in (0, 1)]
        return float(np.mean(np.maximum(rises, 0.0)))

    scaled, plain = t1(1.5 * 5), t1(1.5)
    assert scaled > 0 and abs(scaled - plain) > 1e-3 * scaled  # the two settings are told apart
    assert term1(True) == pytest.approx(scaled, rel=1e-8)
    assert term1(False) == pytest.approx(plain, rel=1e-8)


def test_per_image_clamp_hand_values() -> None:
    """transfer_clamp="image": the mean over images of each image's clamped increase, which keeps a
    gradient where the released clamp (after the batch mean) has none."""
    x, y, w, b, models = two_linear_models(3, 6)
    kw = dict(n=2, eps1=6.0, eps2=0.4, w_angle=0.0, w_transfer1=0.5, w_transfer2=0.7)
    active = ActiveTerms(False, True, True)
    image = disjoint_loss(models, torch.tensor(x), torch.tensor(y), make_config(**kw, transfer_clamp="image"), active)
    batch = disjoint_loss(models, torch.tensor(x), torch.tensor(y), make_config(**kw), active)

    xf, z, grads, per_image = by_hand(x, y, w, b)

    def increase(i: int, delta: np.ndarray) -> float:
        return float(np.mean(np.maximum(per_image((xf + delta) @ w[i].T + b[i]) - per_image(z[i]), 0.0)))

    t1 = np.mean([increase(0, 6.0 * grads[1]), increase(1, 6.0 * grads[0])])
    t2 = np.mean([increase(0, 0.4 * np.tanh(2e4 * grads[1])), increase(1, 0.4 * np.tanh(2e4 * grads[0]))])
    assert image.transfer1.item() == pytest.approx(t1, rel=1e-8)
    assert image.transfer2.item() == pytest.approx(t2, rel=1e-8)
    assert image.classification.item() == pytest.approx(batch.classification.item(), rel=1e-12)
    # mean of clamps >= clamp of means, strictly here: some images lose, others gain
    assert image.transfer2.item() > batch.transfer2.item() >= 0


@pytest.mark.parametrize("grow", [False, True])
def test_unclamped_terms_keep_negative_increases_against_a_detached_clean_loss(grow: bool) -> None:
    """transfer_clamp="none": each pair's plain mean increase, negative ones included (where the
    released clamp reads 0), in the joint loss and in a grown model's (model 0 new, model 1 frozen); where
    every increase is positive, the value and gradient of `batch` with a detached clean loss."""
    kw = dict(n=2, eps1=6.0, eps2=0.4, w_angle=0.0, w_transfer1=0.5, w_transfer2=0.7)
    active = ActiveTerms(False, True, True)

    def parts(seed: int, **extra):
        x, y, w, b, models = two_linear_models(seed, 6)
        for m in models:
            m.zero_grad()
        xt, yt, cfg = torch.tensor(x), torch.tensor(y), make_config(**kw, **extra)
        out = (growth_loss(models[0], models[1:], xt, yt, cfg, active) if grow
               else disjoint_loss(models, xt, yt, cfg, active))
        out.total.backward()
        return out, [p.grad.clone() for m in models for p in m.parameters() if p.grad is not None]

    x, y, w, b, _ = two_linear_models(1, 6)  # transfer term 2: one pair's increase below zero, one above
    xf, z, grads, _ = by_hand(x, y, w, b)
    clean = [ce(zi, y) for zi in z]

    def increase(i: int, delta: np.ndarray) -> float:
        return ce((xf + delta) @ w[i].T + b[i], y) - clean[i]

    t2_pairs = [increase(0, 0.4 * np.tanh(2e4 * grads[1])), increase(1, 0.4 * np.tanh(2e4 * grads[0]))]
    t1 = np.mean([increase(0, 6.0 * grads[1]), increase(1, 6.0 * grads[0])])
    assert min(t2_pairs) < 0 < max(t2_pairs)  # the case the clamp changes
    unclamped, _ = parts(1, transfer_clamp="none")
    clamped, _ = parts(1)
    assert unclamped.transfer2.item() == pytest.approx(np.mean(t2_pairs), rel=1e-8)
    assert unclamped.transfer1.item() == pytest.approx(t1, rel=1e-8)
    assert clamped.transfer2.item() == pytest.approx(np.mean(np.maximum(t2_pairs, 0)), rel=1e-8)

    none, none_grads = parts(3, transfer_clamp="none")  # every increase positive: no clamp acts
    detached, detached_grads = parts(3, detach_clean=True)
    assert none.total.item() == pytest.approx(detached.total.item(), rel=1e-12)
    assert none.transfer2.item() > 0 and len(none_grads) == len(detached_grads) > 0
    for a, c in zip(none_grads, detached_grads, strict=True):
        assert torch.allclose(a, c, atol=1e-12)


@pytest.mark.parametrize("clamp", ["batch", "image"])
@pytest.mark.parametrize("grow", [False, True])
def test_detached_clean_loss_changes_only_the_gradient(clamp: str, grow: bool) -> None:
    """detach_clean: the same values, and a gradient that lacks exactly the live clean loss's share,
    −w·(1/pairs)·(1/B)·Σ ∇ℓ_i(x_k) over the images (per-image clamp) or batches (batch clamp) where
    the term is active; in the joint loss and in a grown model's (model 0 new, model 1 frozen)."""
    x, y, w, b, models = two_linear_models(3, 6)
    xt, yt = torch.tensor(x), torch.tensor(y)
    kw = dict(n=2, eps2=0.4, w_class=0.0, w_angle=0.0, w_transfer1=0.0, w_transfer2=0.7, transfer_clamp=clamp)
    active = ActiveTerms(False, False, True)

    def run(detach: bool) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        for m in models:
            m.zero_grad()
        cfg = make_config(**kw, detach_clean=detach)
        parts = (growth_loss(models[0], models[1:], xt, yt, cfg, active) if grow
                 else disjoint_loss(models, xt, yt, cfg, active))
        parts.total.backward()
        weights = [m[1].weight.grad.clone() for m in models]
        return float(parts.total.detach()), weights, [m[1].bias.grad.clone() for m in models]

    live, live_w, live_b = run(False)
    fixed, fixed_w, fixed_b = run(True)
    assert fixed == pytest.approx(live, rel=1e-12) and live > 0

    # which images (or the whole batch) the term is active on, from the hand formula of Eq. 4
    xf, z, grads, per_image = by_hand(x, y, w, b)

    for i, j in ((0, 1),) if grow else ((0, 1), (1, 0)):  # a frozen model's clean loss is a constant
        rise = per_image((xf + 0.4 * np.tanh(2e4 * grads[j])) @ w[i].T + b[i]) - per_image(z[i])
        mask = rise > 0 if clamp == "image" else np.full(6, rise.mean() > 0)
        models[i].zero_grad()
        clean = F.cross_entropy(models[i](xt), yt, reduction="none")
        (-0.7 / 2 / 6 * clean[torch.tensor(mask)].sum()).backward()  # the live clean loss's share
        assert torch.allclose(live_w[i] - fixed_w[i], models[i][1].weight.grad, atol=1e-10)
        assert torch.allclose(live_b[i] - fixed_b[i], models[i][1].bias.grad, atol=1e-10)
    assert not torch.allclose(live_w[0], fixed_w[0])  # the check has a share to find


def test_mean_reduction_and_inactive_terms() -> None:
    models = [linear_model(np.eye(3, 4) * (k + 1), np.zeros(3)) for k in range(3)]
    x, y = torch.rand(6, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = make_config(n=3, class_reduction="mean")
    parts = disjoint_loss(models, x, y, cfg, ActiveTerms())
    expected = np.mean([F.cross_entropy(m(x), y).item() for m in models])
    assert parts.classification.item() == pytest.approx(expected)
    assert parts.angle.item() == parts.transfer1.item() == parts.transfer2.item() == 0.0


class Functional(nn.Module):
    """A module whose parameters are given tensors, so gradcheck can differentiate through them."""

    def __init__(self, base: nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base, self.params = base, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, self.params, (x,))


@pytest.mark.parametrize("sample, w_smooth", [(None, 0.0), ([0, 2], 0.0), ([0, 2], 0.7)])
def test_double_backprop_matches_finite_differences(sample: list[int] | None, w_smooth: float) -> None:
    """∂L_total/∂θ through the input gradients (second order) against central differences, with and
    without the smoothness term (`--w-smooth`)."""
    torch.manual_seed(0)
    bases = [
        nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double() for _ in range(3)
    ]
    names = [list(dict(b.named_parameters())) for b in bases]
    flat = [p.detach().clone() for b in bases for p in b.parameters()]
    x = torch.rand(6, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    # tanh_scale small so the soft sign is smooth at the finite-difference step.
    cfg = make_config(n=3, eps1=20.0, eps2=0.3, tanh_scale=30.0, w_angle=0.5,
                      angle_window=TermWindow(1, None), w_smooth=w_smooth)

    def total(*params: torch.Tensor) -> torch.Tensor:
        models, k = [], 0
        for base, keys in zip(bases, names, strict=True):
            models.append(Functional(base, dict(zip(keys, params[k : k + len(keys)], strict=True))))
            k += len(keys)
        parts = disjoint_loss(models, x, y, cfg, ActiveTerms(True, True, True, smooth=w_smooth > 0), sample)
        assert parts.transfer1.item() > 0 and parts.transfer2.item() > 0
        assert (parts.smooth is not None) == (w_smooth > 0)
        return parts.total

    inputs = tuple(p.requires_grad_(True) for p in flat)
    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("w_smooth, pair_scale", [(0.0, 1.0), (0.7, 0.5)])
def test_growth_loss_double_backprop_matches_finite_differences(w_smooth: float, pair_scale: float) -> None:
    """∂(growth loss)/∂θ_new against central differences: the angular term, both transfer directions (the
    new → frozen one through the new model's input gradient, second order) and, with it on, the
    smoothness term; the frozen models are constants."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    frozen = [nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().requires_grad_(False)
              for _ in range(2)]
    names = list(dict(base.named_parameters()))
    x = torch.rand(6, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    # tanh_scale small so the soft sign is smooth at the finite-difference step.
    cfg = make_config(n=3, eps1=20.0, eps2=0.3, tanh_scale=30.0, w_angle=0.5, w_smooth=w_smooth)
    active = ActiveTerms(True, True, True, smooth=w_smooth > 0)

    def total(*params: torch.Tensor) -> torch.Tensor:
        new = Functional(base, dict(zip(names, params, strict=True)))
        parts = growth_loss(new, frozen, x, y, cfg, active, pair_scale)
        assert parts.angle.item() > 0 and parts.transfer1.item() > 0 and parts.transfer2.item() > 0
        assert (parts.smooth is not None) == (w_smooth > 0)
        return parts.total

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in base.parameters())
    assert torch.autograd.gradcheck(total, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_adp_loss_gradient_matches_finite_differences() -> None:
    """∂(ADP loss)/∂logits of every member (Σ CE − α·entropy − β·log det) against central differences."""
    from deflect.train.baselines import adp_loss

    torch.manual_seed(0)
    logits = tuple(torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.zeros(4, 1)  # what each stand-in model ignores: it returns its member's logits
    y = torch.tensor([0, 3, 1, 4])

    def total(*z: torch.Tensor) -> torch.Tensor:
        members = [lambda _x, zi=zi: zi for zi in z]
        loss, parts = adp_loss(members, x, y, alpha=2.0, beta=0.5)
        assert parts["entropy"] > 0 and parts["log_det"] != 0
        return loss

    assert torch.autograd.gradcheck(total, logits, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_transfer_gradient_reaches_source_model() -> None:
    """No detach: model j's parameters get gradient from L_i(x + ε·g_j) (second-order path)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)) for _ in range(2)]
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    cfg = make_config(n=2, w_class=0.0, w_angle=0.0, w_transfer1=1.0, w_transfer2=0.0, eps1=50.0)
    parts = disjoint_loss(models, x, y, cfg, ActiveTerms(transfer1=True))
    assert parts.transfer1.item() > 0
    grads = torch.autograd.grad(parts.total, list(models[1].parameters()))
    assert any(g.abs().sum() > 0 for g in grads)


def test_smoothness_is_each_images_squared_input_gradient_norm() -> None:
    """The smoothness term (TRS, `--w-smooth`) against the hand formula of a linear softmax model:
    an image's own gradient is Wᵀ(p − onehot(y)); the term is the mean of its squared norm over
    images, then over the models that take input gradients; the total carries it at its weight."""
    rng = np.random.default_rng(3)
    w = [rng.normal(size=(3, 4)) for _ in range(3)]
    b = [rng.normal(size=3) for _ in range(3)]
    models = [linear_model(w[k], b[k]) for k in range(3)]
    x = torch.tensor(rng.random((6, 1, 2, 2)))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    xf, onehot = x.flatten(1).numpy(), np.eye(3)[y.numpy()]

    def norms(k: int) -> float:  # model k's mean over images of ‖Wᵀ(p − onehot)‖²
        return float(np.mean((((softmax(xf @ w[k].T + b[k]) - onehot) @ w[k]) ** 2).sum(1)))

    by_hand = np.mean([norms(k) for k in range(3)])
    kw = dict(n=3, w_angle=0.0, w_transfer1=0.0, w_transfer2=0.0)
    on = disjoint_loss(models, x, y, make_config(**kw, w_smooth=0.25), ActiveTerms(smooth=True))
    off = disjoint_loss(models, x, y, make_config(**kw), ActiveTerms())
    assert on.smooth is not None and off.smooth is None and "smooth" not in off.as_floats()
    assert on.smooth.item() == pytest.approx(by_hand, rel=1e-10)
    assert on.total.item() == pytest.approx(off.total.item() + 0.25 * by_hand, rel=1e-10)
    # only the sampled models take input gradients once the angular term is off: the term covers those
    two = disjoint_loss(models, x, y, make_config(**kw, w_smooth=0.25), ActiveTerms(smooth=True), [0, 2])
    assert two.smooth is not None and two.smooth.item() == pytest.approx((norms(0) + norms(2)) / 2, rel=1e-10)
    # a grown model's term is its own gradient's
    grown = growth_loss(models[1], [models[0]], x, y, make_config(**kw, w_smooth=0.25), ActiveTerms(smooth=True))
    assert grown.smooth is not None and grown.smooth.item() == pytest.approx(norms(1), rel=1e-10)
    assert grown.total.item() == pytest.approx(ce(xf @ w[1].T + b[1], y.numpy()) + 0.25 * norms(1), rel=1e-10)
