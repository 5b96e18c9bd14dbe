"""Training runs: database rows per epoch, checkpoints, resume equivalence, accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import deflect
from deflect.checkpoint import model_file
from deflect.cli import app
from deflect.config import make_config
from deflect.errors import DeflectError
from deflect.inference import bf16_supported
from deflect.store import Store
from deflect.train import Callbacks, train
from tests.conftest import tiny_config


def test_run_writes_rows_per_epoch_and_reloads(store: Store) -> None:
    cfg = tiny_config(n=3, epochs=3)
    run_id = train(cfg, store)
    run = store.get_run(run_id)
    assert run.status == "finished" and run.epochs_done == 3 and run.n == 3
    epochs = store.epochs(run_id)
    assert [m.epoch for m in epochs] == [1, 2, 3]
    for m in epochs:
        assert len(m.clean_acc) == 3 and all(0 <= a <= 100 for a in m.clean_acc)
        assert m.loss_total > 0 and m.val_loss > 0
    # Schedule of the digits preset: angle in epochs 1-2, transfer terms from epoch 2.
    assert epochs[0].loss_angle > 0 and epochs[0].loss_transfer1 == 0 and epochs[2].loss_angle == 0
    assert epochs[1].loss_transfer2 > 0
    assert store.checkpoint_digests(run_id).keys() >= {"model_0.safetensors", "state.1.safetensors"}

    models = deflect.load_set(run_id, store)
    assert len(models) == 3 and all(not m.training for m in models)
    test = deflect.load_dataset("digits", "test")
    x, y = test.batch(torch.arange(len(test)))
    with torch.no_grad():
        accs = [100 * (m(x).argmax(1) == y).float().mean().item() for m in models]
    best = next(m for m in epochs if m.epoch == run.best_epoch)
    assert accs == pytest.approx(best.clean_acc, abs=1e-3)
    # A run directory loads without the database, through its manifest.
    assert len(deflect.load_set(run.run_dir)) == 3


def test_resume_equals_uninterrupted_run(store: Store) -> None:
    cfg = tiny_config(epochs=3)
    full = train(cfg, store)

    def stop_after_first(metric: object) -> None:
        if metric.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, Callbacks(on_epoch=stop_after_first))
    interrupted = store.list_runs()[-1]
    assert interrupted.status == "interrupted" and interrupted.epochs_done == 1
    resumed = train(store=store, resume=interrupted.id)
    assert resumed == interrupted.id and store.get_run(resumed).status == "finished"
    assert [m.epoch for m in store.epochs(resumed)] == [1, 2, 3]
    for a, b in zip(deflect.load_set(full, store), deflect.load_set(resumed, store), strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb), ka
    with pytest.raises(DeflectError, match="already finished"):
        train(store=store, resume=resumed)


def test_tampered_checkpoint_is_refused(store: Store) -> None:
    run_id = train(tiny_config(epochs=1), store)
    path = model_file(__import__("pathlib").Path(store.get_run(run_id).run_dir), 0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DeflectError, match="sha256"):
        deflect.load_set(run_id, store)


def test_sampling_and_independent_method(store: Store) -> None:
    cfg = tiny_config(n=5, epochs=1)
    assert cfg.pair_sample_size() == 3
    ind = make_config(n=2, method="independent", epochs=1, train_limit=256, width=8)
    run_id = train(ind, store)
    metric = store.epochs(run_id)[0]
    assert metric.loss_angle == metric.loss_transfer1 == metric.loss_transfer2 == 0.0


def test_pair_sampling_draws_varying_seeded_subsets(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """n = 5 samples `pair_sample_size()` models per batch for the transfer terms: a sorted subset of
    that size, drawn afresh each batch from the epoch's generator (so different batches get different
    pairs and every model is drawn), and the same draws again under the same seed. (Epoch 1 of the
    digits preset has no transfer term and the angular term is off here, so the steps are cheap.)"""
    from deflect.train import disjoint, runner

    real = disjoint.method_loss
    drawn: list[tuple[int, ...]] = []

    def spy(models, x, y, cfg, active, sample, *args, **kwargs):
        drawn.append(tuple(sample))
        return real(models, x, y, cfg, active, sample, *args, **kwargs)

    monkeypatch.setattr(disjoint, "method_loss", spy)
    monkeypatch.setattr(runner, "validation_loss", lambda *args: 1.0)  # every pair on the split: not needed here

    def draws(**overrides: object) -> list[tuple[int, ...]]:
        drawn.clear()
        cfg = tiny_config(n=5, epochs=1, width=4, batch_size=32, train_limit=320, w_angle=0.0, **overrides)
        train(cfg, store)
        assert len(drawn) == 320 // 32
        return list(drawn)

    assert tiny_config(n=5).pair_sample_size() == 3
    first = draws()
    for sample in first:
        assert len(sample) == 3 and list(sample) == sorted(set(sample)) and set(sample) <= set(range(5))
    assert len(set(first)) > 1  # not one fixed subset
    assert set().union(*first) == set(range(5))  # every model is drawn
    assert draws() == first  # seeded
    assert draws(seed=1) != first
    assert all(len(s) == 4 for s in draws(sample_models=4))


@pytest.mark.parametrize("select, best", [("val-loss", 2), ("last", 3)])
def test_the_kept_checkpoint_is_the_lowest_validation_loss(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                           select: str, best: int) -> None:
    """`select="val-loss"` keeps the epoch of lowest validation loss (here the middle one), not the last:
    the run's best epoch, the saved models' metadata and weights, and the run's clean accuracy are that
    epoch's; `select="last"` keeps the last epoch whatever its validation loss."""
    from pathlib import Path

    from deflect.checkpoint import load_tensors_meta
    from deflect.train import runner

    losses = iter([1.0, 0.5, 0.9])
    monkeypatch.setattr(runner, "validation_loss", lambda *args: next(losses))
    weights: dict[int, list[dict[str, torch.Tensor]]] = {}

    def keep(metric: object) -> None:  # each epoch's weights, from its resume state
        tensors, _ = load_tensors_meta(Path(store.get_run(metric.run_id).run_dir) / runner.state_file(metric.epoch))
        weights[metric.epoch] = [{k[len(f"model.{i}."):]: v for k, v in tensors.items()
                                  if k.startswith(f"model.{i}.")} for i in range(2)]

    run_id = train(tiny_config(epochs=3, width=4, train_limit=128, select=select), store, Callbacks(on_epoch=keep))
    run = store.get_run(run_id)
    rows = store.epochs(run_id)
    assert [r.val_loss for r in rows] == [1.0, 0.5, 0.9]
    assert run.best_epoch == best
    assert run.clean_acc == rows[best - 1].clean_acc
    assert all(any(not torch.equal(v, weights[e][0][k]) for k, v in weights[best][0].items())
               for e in (1, 2, 3) if e != best)  # the epochs' weights tell them apart
    digests = store.checkpoint_digests(run_id)
    for i in range(2):
        tensors, meta = load_tensors_meta(model_file(Path(run.run_dir), i), digests[f"model_{i}.safetensors"])
        assert meta == {"run": run_id, "epoch": best, "index": i}
        assert tensors.keys() == weights[best][i].keys()
        assert all(torch.equal(v, weights[best][i][k]) for k, v in tensors.items())
    loaded = deflect.load_set(run_id, store)
    assert all(torch.equal(v, weights[best][0][k]) for k, v in loaded[0].state_dict().items())


def test_cyclic_lr_rises_from_zero_to_the_peak_and_back() -> None:
    """One SGD over every model's parameters, its per-batch LR a triangle 0 → lr_max (half way) → 0,
    its momentum the mirror image (momentum → base_momentum → momentum)."""
    from torch import nn

    from deflect.train.runner import _optimizer

    cfg = tiny_config(lr_max=0.08)
    models = [nn.Linear(3, 2), nn.Linear(3, 2)]
    steps = 10
    opt, sched = _optimizer(models, cfg, steps)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for m in models for p in m.parameters()}
    lrs, momenta = [], []
    for _ in range(steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    want = [cfg.lr_max * (1 - abs(t - steps / 2) / (steps / 2)) for t in range(steps + 1)]
    assert lrs == pytest.approx(want, abs=1e-12)
    assert lrs[0] == pytest.approx(0.0, abs=1e-12) and max(lrs) == pytest.approx(cfg.lr_max)
    assert lrs[steps // 2] == pytest.approx(cfg.lr_max) and lrs[steps] == pytest.approx(0.0, abs=1e-12)
    assert momenta[0] == pytest.approx(cfg.momentum) and momenta[steps // 2] == pytest.approx(cfg.base_momentum)
    assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay


def test_epoch_rows_store_the_last_batchs_learning_rate(store: Store) -> None:
    """The `lr` column is the LR the epoch's last batch trained with, on the run's one triangle over
    every batch of every epoch (5 batches an epoch here: up over epoch 1, down over epoch 2)."""
    cfg = tiny_config(epochs=2, width=4, train_limit=320, batch_size=64, lr_max=0.08)
    rows = store.epochs(train(cfg, store))
    batches = 320 // 64
    up = cfg.epochs * batches // 2

    def lr(t: int) -> float:  # the LR of batch t (0-based, over the whole run)
        return cfg.lr_max * (t / up if t <= up else 1 - (t - up) / (cfg.epochs * batches - up))

    assert [r.lr for r in rows] == pytest.approx([lr(e * batches - 1) for e in (1, 2)], abs=1e-9)
    assert rows[0].lr == pytest.approx(0.8 * cfg.lr_max) and rows[1].lr == pytest.approx(0.2 * cfg.lr_max)


def test_digits_default_recipe_is_accurate(digits_runs: tuple[Store, dict[str, str]]) -> None:
    """`deflect train --n 3 --dataset digits` (default preset): every model ≥ 90% clean."""
    store, ids = digits_runs
    for run_id in ids.values():
        run = store.get_run(run_id)
        assert run.status == "finished" and run.epochs_done == run.epochs_total == 12
        assert min(run.clean_acc) >= 90.0, run.clean_acc


def test_bad_config_values() -> None:
    with pytest.raises(DeflectError, match="at least 2"):
        make_config(n=1)
    with pytest.raises(DeflectError, match="unknown dataset"):
        make_config(dataset="imagenet")
    with pytest.raises(DeflectError, match="unknown preset"):
        make_config(preset="nope")
    with pytest.raises(DeflectError, match="non-negative"):
        make_config(eps2=-1.0)


def test_paper_preset_follows_released_code() -> None:
    c3 = make_config(n=3, dataset="cifar10")
    assert (c3.arch, c3.batch_size, c3.epochs, c3.lr_max, c3.class_reduction) == (
        "preact-resnet18", 120, 75, 0.2, "mean")
    assert (c3.w_angle, c3.w_transfer1, c3.w_transfer2, c3.eps1) == (0.4, 0.5, 0.4, 6.0)
    assert c3.transfer1_window.first == 2 and c3.transfer2_window.first == 3 and c3.angle_window.last == 4
    c8 = make_config(n=8, dataset="cifar10")
    assert (c8.batch_size, c8.epochs, c8.lr_max, c8.w_transfer1, c8.pair_sample_size()) == (75, 130, 0.1, 0.8, 3)
    assert not c8.normalize and c8.augment


def test_paper_cifar10_preset_trains_on_synthetic_data(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Smoke run of the paper's recipe (PreAct ResNet18, raw inputs, augmentation) on fake CIFAR-10."""
    from deflect import data as data_mod

    gen = torch.Generator().manual_seed(0)
    fake = {
        True: ((torch.rand(40, 3, 32, 32, generator=gen) * 255).to(torch.uint8), torch.arange(40) % 10),
        False: ((torch.rand(8, 3, 32, 32, generator=gen) * 255).to(torch.uint8), torch.arange(8) % 10),
    }
    monkeypatch.setattr(data_mod, "_torchvision", lambda name, train, data_dir, download: fake[train])
    cfg = make_config(n=3, dataset="cifar10", epochs=1, batch_size=4, train_limit=8)
    assert cfg.arch == "preact-resnet18" and cfg.augment and not cfg.normalize
    run_id = train(cfg, store)
    run = store.get_run(run_id)
    assert run.status == "finished" and len(run.clean_acc) == 3
    models = deflect.load_set(run_id, store)
    assert models[0](torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_augment_keeps_shape_and_pixels() -> None:
    from deflect.train.disjoint import augment

    x = torch.rand(6, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # Every output is a shifted (and maybe mirrored) copy: its non-zero pixels come from x.
    values = set(x.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= values


@pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16")
def test_bf16_training_on_a_bf16_cpu_tracks_float32(store: Store) -> None:
    """`--bf16` autocasts the disjoint step on a CPU with native bf16: the same losses within
    bf16 rounding, every term present, models stored in float32."""
    runs = {bf16: train(tiny_config(n=3, epochs=2, bf16=bf16), store) for bf16 in (False, True)}
    full, half = (store.epochs(runs[b]) for b in (False, True))
    for a, b in zip(full, half, strict=True):
        assert b.loss_class == pytest.approx(a.loss_class, rel=0.05)
        assert b.loss_angle == pytest.approx(a.loss_angle, rel=0.1, abs=1e-3)
    assert [e.loss_total for e in half] != [e.loss_total for e in full]  # the autocast took effect
    assert half[1].loss_transfer2 > 0 and store.get_run(runs[True]).config["bf16"] is True
    models = deflect.load_set(runs[True], store)
    assert all(p.dtype == torch.float32 for m in models for p in m.parameters())


def test_bf16_training_is_refused_where_it_is_not_native(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import deflect.inference as inference

    monkeypatch.setattr(inference, "bf16_supported", lambda device: False)
    with pytest.raises(DeflectError, match="native bf16"):
        train(tiny_config(bf16=True), store)
    assert store.list_runs() == []  # refused before a run is created


def test_transfer_until_ends_the_transfer_terms(store: Store) -> None:
    """`--transfer-until N`: both transfer windows keep their start and end at N, the later epochs
    train on classification alone, and the epochs before match a run without the option."""
    runner = CliRunner()
    base = ["train", "--n", "3", "--epochs", "3", "--limit", "320", "--width", "8", "--db", str(store.path), "--json"]
    cut = runner.invoke(app, [*base, "--transfer-until", "2"])
    assert cut.exit_code == 0, cut.output
    run = json.loads(cut.stdout)
    assert run["config"]["transfer1_window"] == {"first": 2, "last": 2}
    assert run["config"]["transfer2_window"] == {"first": 2, "last": 2}
    rows = store.epochs(run["id"])
    assert rows[1].loss_transfer2 > 0
    last = rows[2]  # the digits preset's angular term ends at epoch 2 too
    assert last.loss_transfer1 == last.loss_transfer2 == last.loss_angle == 0.0
    assert last.loss_total == pytest.approx(last.loss_class)
    full = json.loads(runner.invoke(app, base).stdout)
    assert full["config"]["transfer1_window"]["last"] is None
    full_rows = store.epochs(full["id"])
    assert [r.loss_total for r in full_rows[:2]] == [r.loss_total for r in rows[:2]]
    assert full_rows[2].loss_transfer2 > 0
    early = runner.invoke(app, [*base, "--transfer-until", "1"])
    assert early.exit_code == 2 and "before the transfer losses start (epoch 2)" in early.output
    assert len(early.output.strip().splitlines()) == 1
