"""Growth's faster paths compute the same objective: the frozen models' cached clean values, and the
new model's perturbed forwards batched into one (BatchNorm per chunk)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import deflect
from deflect.config import make_config
from deflect.data import dataset_info
from deflect.inference import inference_copy
from deflect.models.factory import build_model
from deflect.runtime import fast_cpu_math
from deflect.train.frozen_cache import FrozenClean
from deflect.train.grow import grow_epoch, growth_loss
from deflect.train.losses import ActiveTerms


@pytest.fixture
def trained(digits_runs):
    store, ids = digits_runs  # trained models: their gradients and loss increases are not trivial
    new, *frozen = deflect.load_set(ids["independent"], store)
    return new, [inference_copy(m, "cpu") for m in frozen], deflect.load_dataset("digits", "train")


@pytest.mark.parametrize(("clamp", "transfer_batch"), [("batch", None), ("image", None), ("batch", 16), ("none", 16)])
def test_cached_values_give_the_same_loss(trained, clamp: str, transfer_batch: int | None) -> None:
    new, frozen, train = trained
    new.eval()
    cfg = make_config(3, "digits", transfer_clamp=clamp, transfer_batch=transfer_batch)
    active = ActiveTerms.all_enabled(cfg)
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:64]
    x, y = train.batch(index)
    cache = FrozenClean(train, torch.device("cpu"))
    cache.rows(frozen, index[:40], x[:40], y[:40])  # some rows stored by an earlier step, the rest computed now
    rows = cache.rows(frozen, index, x, y)
    assert rows is not None and all(cache.known(m) == 64 for m in frozen)
    computed = growth_loss(new, frozen, x, y, cfg, active)
    read = growth_loss(new, frozen, x, y, cfg, active, frozen_clean=rows)
    computed.total.backward()
    grads = [p.grad.clone() for p in new.parameters()]
    new.zero_grad()
    read.total.backward()
    for name, value in computed.as_floats().items():
        assert read.as_floats()[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert computed.as_floats()["transfer1"] > 0 and computed.as_floats()["angle"] != 0
    for a, p in zip(grads, new.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_rows_are_each_images_own_gradient_computed_once(trained, monkeypatch) -> None:
    """A row is the gradient of that image's own loss, computed by the first step that needs it only."""
    import deflect.train.frozen_cache as frozen_cache

    _, frozen, train = trained
    cache = FrozenClean(train, torch.device("cpu"))
    computed: list[int] = []
    real = frozen_cache.per_image_gradients
    monkeypatch.setattr(frozen_cache, "per_image_gradients",
                        lambda model, x, y, bf16=False: computed.append(len(x)) or real(model, x, y, bf16))
    index = torch.tensor([5, 300, 7])
    ((losses, grads),) = cache.rows(frozen[:1], index, *train.batch(index))
    again = torch.tensor([7, 8, 300])
    ((losses2, _),) = cache.rows(frozen[:1], again, *train.batch(again))
    assert computed == [3, 1] and cache.known(frozen[0]) == 4  # only image 8 was new the second time
    assert float(losses2[0]) == float(losses[2]) and float(losses2[2]) == float(losses[1])
    for k, i in enumerate(index.tolist()):
        x, y = train.batch(torch.tensor([i]))
        x.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(frozen[0](x), y)
        (g,) = torch.autograd.grad(loss, x)
        assert float(losses[k]) == pytest.approx(float(loss.detach()), rel=1e-5)
        torch.testing.assert_close(grads[k], g[0], rtol=1e-4, atol=1e-8)


def test_budget_falls_back_to_computing(trained) -> None:
    _, frozen, train = trained
    one_model = FrozenClean(train, torch.device("cpu")).bytes_per_model
    cache = FrozenClean(train, torch.device("cpu"), budget_bytes=one_model)
    x, y = train.batch(torch.arange(4))
    assert cache.rows(frozen[:1], torch.arange(4), x, y) is not None
    assert cache.rows(frozen, torch.arange(4), x, y) is None  # the second model does not fit: the step computes both
    assert cache.known(frozen[0]) == 4 and cache.known(frozen[1]) == 0


@fast_cpu_math()
def test_epochs_with_the_cache_train_the_same_model(trained) -> None:
    """Two epochs of growth with and without the cache end at the same weights (float rounding apart),
    far from where they started."""
    _, frozen, train = trained
    small = train.subset(torch.arange(256))
    cfg = dataclasses.replace(make_config(3, "digits", epochs=2), batch_size=32)
    assert ActiveTerms.for_epoch(cfg, 1).angle and ActiveTerms.for_epoch(cfg, 2).transfer1
    cache = FrozenClean(small, torch.device("cpu"))
    results = []
    for use in (None, cache):
        torch.manual_seed(3)
        new = build_model(cfg.arch, dataset_info(cfg.dataset), cfg.normalize, cfg.width)
        start = {k: v.clone() for k, v in new.state_dict().items()}
        opt = torch.optim.SGD(new.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        for epoch in (1, 2):
            grow_epoch(new, frozen, opt, sched, small, cfg, epoch, 0, 1, torch.device("cpu"), cache=use)
        results.append(new.state_dict())
    # both were sampled over 16 steps; their rows were stored as steps first needed them, then read
    assert all(cache.known(m) > 0 for m in frozen)
    weight = next(k for k in start if k.endswith("weight"))
    assert (results[0][weight] - start[weight]).abs().max() > 1e-3
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(("clamp", "clean_bn_stats"), [("batch", False), ("image", True)])
def test_batched_forwards_give_the_same_loss_gradients_and_buffers(trained, clamp: str, clean_bn_stats: bool) -> None:
    new, frozen, train = trained
    new.train()  # training mode: BatchNorm's batch statistics and running statistics are in play
    cfg = make_config(3, "digits", transfer_clamp=clamp, transfer_batch=16, clean_bn_stats=clean_bn_stats)
    active = ActiveTerms.all_enabled(cfg)
    x, y = train.batch(torch.arange(48))
    start = copy.deepcopy(new.state_dict())
    results = []
    for batched in (False, True):
        new.load_state_dict(start)
        new.zero_grad()
        parts = growth_loss(new, frozen, x, y, cfg, active, batched=batched)
        parts.total.backward()
        results.append((parts.as_floats(), [p.grad.clone() for p in new.parameters()],
                        {k: v.clone() for k, v in new.state_dict().items()}))
    (values, grads, buffers), (values_b, grads_b, buffers_b) = results
    assert values["transfer1"] > 0 and values["transfer2"] > 0
    for name, value in values.items():
        assert values_b[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    for a, b in zip(grads, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for key, value in buffers.items():
        torch.testing.assert_close(buffers_b[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(buffers_b["features.1.num_batches_tracked"]) - int(start["features.1.num_batches_tracked"]) == (
        2 if clean_bn_stats else 2 + 2 * len(frozen))  # 2 clean forwards, and the 2·S perturbed ones unless kept out
