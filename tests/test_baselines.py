"""The peers' objectives (deflect.train.baselines) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deflect.train.baselines import adp_terms, dataset_eps, fast_at_loss, fgsm_rs


def test_dataset_budgets() -> None:
    assert dataset_eps("fashion-mnist") == pytest.approx(0.1)
    assert dataset_eps("digits") == pytest.approx(0.15)
    assert dataset_eps("cifar10") == pytest.approx(8 / 255, abs=5e-4)


def test_fgsm_rs_stays_in_budget_and_box_and_climbs_the_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))
    x[0] = 0.0  # pixels at the box edge
    gen = torch.Generator().manual_seed(1)
    adv = fgsm_rs(model, x, y, eps=0.1, alpha=0.125, gen=gen)
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(model(adv), y)) > float(loss(model(x), y))
    again = fgsm_rs(model, x, y, eps=0.1, alpha=0.125, gen=torch.Generator().manual_seed(1))
    assert torch.equal(adv, again)  # the random start comes from the epoch's generator


def test_fast_at_loss_skips_frozen_models() -> None:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(3)]
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    total, parts = fast_at_loss(models, x, y, 0.1, torch.Generator().manual_seed(0), frozen=[1])
    total.backward()
    assert models[1][1].weight.grad is None and models[0][1].weight.grad is not None
    assert parts["adv"] == pytest.approx(total.item()) and math.isfinite(parts["total"])


def test_fast_at_loss_is_ce_on_fgsm_rs_examples_from_the_epoch_generator() -> None:
    """fast-AT's loss is Σ over the unfrozen models of CE on each model's own FGSM-RS examples (α = 1.25ε),
    drawn in model order from the generator it is given; those examples cost more than the clean images."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(3)]
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    eps = 0.2
    total, parts = fast_at_loss(models, x, y, eps, torch.Generator().manual_seed(5), frozen=[1])
    gen = torch.Generator().manual_seed(5)
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        clean = sum(float(ce(models[i](x), y)) for i in (0, 2))
    want = 0.0
    for i in (0, 2):
        adv = fgsm_rs(models[i], x, y, eps, 1.25 * eps, gen)
        with torch.no_grad():
            want += float(ce(models[i](adv), y))
    assert float(total.detach()) == pytest.approx(want, rel=1e-6)
    assert parts["adv"] == parts["class"] == parts["total"] == pytest.approx(want, rel=1e-6)
    assert float(total.detach()) > clean + 0.05


def test_robust_first_batch_is_pgd_accuracy_below_clean() -> None:
    """The early-stop signal is each model's accuracy on PGD-5 (α = ε/4, random start from a generator
    seeded with the run's seed) in eval mode, not its clean accuracy; train mode is restored after."""
    from deflect.attacks import PGD
    from deflect.train.baselines import robust_first_batch

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)) for _ in range(2)]
    x = torch.rand(64, 1, 4, 4)
    for m in models:  # one training-mode pass moves the running statistics: eval mode now differs from train mode
        with torch.no_grad():
            m(x)
    models[1].eval()
    with torch.no_grad():
        y = models[0].eval()(x).argmax(1)  # model 0 is right on every clean image
    models[0].train()
    eps, seed = 0.3, 3
    accs = robust_first_batch(models, x, y, eps, seed)
    assert models[0].training and not models[1].training
    clean, want = [], []
    for m in models:
        m.eval()
        attack = PGD(eps=eps, alpha=eps / 4, steps=5, generator=torch.Generator().manual_seed(seed))
        adv = attack(m, x, y)
        with torch.no_grad():
            clean.append(float((m(x).argmax(1) == y).float().mean()))
            want.append(float((m(adv).argmax(1) == y).float().mean()))
    assert accs == pytest.approx(want, abs=1e-9)
    assert clean[0] == 1.0 and all(a < c for a, c in zip(accs, clean, strict=True))


def test_adp_terms_match_a_hand_computation() -> None:
    logits = [torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]), torch.tensor([[0.0, 1.0, 2.0], [1.5, -0.5, 0.0]])]
    y = torch.tensor([0, 2])
    ce, entropy, log_det = adp_terms(logits, y)
    p = [np.exp(z.numpy()) / np.exp(z.numpy()).sum(1, keepdims=True) for z in logits]
    want_ce = sum(-np.log(pi[np.arange(2), y.numpy()]).mean() for pi in p)
    mean = (p[0] + p[1]) / 2
    want_entropy = -(mean * np.log(mean + 1e-20)).sum(1).mean()
    dets = []
    for b in range(2):
        rows = []
        for pi in p:
            v = pi[b].copy()
            v[y[b]] = 0.0
            rows.append(v / np.linalg.norm(v))
        m = np.stack(rows)
        dets.append(np.log(np.linalg.det(m @ m.T + 1e-6 * np.eye(2))))
    assert float(ce) == pytest.approx(want_ce, rel=1e-5)
    assert float(entropy) == pytest.approx(want_entropy, rel=1e-5)
    assert float(log_det) == pytest.approx(np.mean(dets), rel=1e-4)


@pytest.mark.parametrize("method, terms, zeros", [
    ("disjoint", ["class", "angle", "transfer1", "transfer2"], []),
    ("independent", ["class"], ["angle", "transfer1", "transfer2"]),
    ("fast-at", ["adv", "robust_first_batch"], ["angle", "transfer1", "transfer2"]),
    ("adp", ["class", "entropy", "log_det"], ["angle", "transfer1", "transfer2"]),
])
def test_each_method_stores_its_loss_terms(method: str, terms: list[str], zeros: list[str], store) -> None:
    """One short epoch of each method on digits, every optional term switched on from epoch 1: the
    method's own terms are in the epoch row, finite and non-zero (a term switched off reads exactly 0,
    which "finite" alone would pass); the disjoint pair terms are 0 for every other method."""
    from deflect.config import TermWindow
    from deflect.train import train
    from tests.conftest import tiny_config

    always = TermWindow(1, None)
    cfg = tiny_config(n=3, method=method, epochs=1, transfer1_window=always, transfer2_window=always)
    assert cfg.angle_window.active(1) and cfg.w_angle > 0 and cfg.w_transfer1 > 0 and cfg.w_transfer2 > 0
    run_id = train(cfg, store)
    run = store.get_run(run_id)
    assert run.status == "finished" and run.method == method
    (row,) = store.epochs(run_id)
    assert row.terms is not None
    for name in terms:
        values = row.terms[name] if isinstance(row.terms[name], list) else [row.terms[name]]
        assert len(values) == (3 if name == "robust_first_batch" else 1), (name, row.terms)
        assert all(math.isfinite(v) and v != 0 for v in values), (name, row.terms)
    for name in zeros:
        assert row.terms[name] == 0.0, (name, row.terms)
    assert row.terms["total"] == pytest.approx(row.loss_total)
    if method == "disjoint":  # the pair terms are on and measured, and the columns carry them
        assert row.loss_angle > 0 and row.loss_transfer1 > 0 and row.loss_transfer2 > 0
        assert (row.loss_angle, row.loss_transfer1, row.loss_transfer2) == (
            row.terms["angle"], row.terms["transfer1"], row.terms["transfer2"])
        assert row.terms["total"] == pytest.approx(row.terms["class"] + cfg.w_angle * row.terms["angle"]
                                                   + cfg.w_transfer1 * row.terms["transfer1"]
                                                   + cfg.w_transfer2 * row.terms["transfer2"], rel=1e-4)
    if method == "independent":
        assert row.terms["total"] == pytest.approx(row.terms["class"])
    if method == "fast-at":  # CE on adversarial examples is positive; PGD accuracy is a share of the batch
        assert row.terms["adv"] > 0 and row.terms["total"] == pytest.approx(row.terms["adv"])
        assert all(0 < a <= 1 for a in row.terms["robust_first_batch"])
    if method == "adp":  # the regularisers are live: entropy of 10 classes is positive, log det below 0
        assert 0 < row.terms["entropy"] <= math.log(10) + 1e-6 and row.terms["log_det"] < 0
        assert row.terms["total"] == pytest.approx(row.terms["class"] - 2 * row.terms["entropy"]
                                                   - 0.5 * row.terms["log_det"], rel=1e-4)


def test_fast_at_rolls_back_a_collapsed_model_and_freezes_it(store, monkeypatch: pytest.MonkeyPatch) -> None:
    from deflect.sets import load_set
    from deflect.train import baselines, train
    from tests.conftest import tiny_config

    accs = iter([[0.6, 0.6], [0.1, 0.6], [0.1, 0.7]])  # model 0 collapses after epoch 2
    monkeypatch.setattr(baselines, "robust_first_batch", lambda *a, **k: next(accs))
    snapshots = []
    from deflect.train import runner

    real = runner._fast_at_check

    def spy(models, *args):
        out = real(models, *args)
        snapshots.append([{k: v.clone() for k, v in m.state_dict().items()} for m in models])
        return out

    monkeypatch.setattr(runner, "_fast_at_check", spy)
    run_id = train(tiny_config(method="fast-at", epochs=3), store)
    rows = store.epochs(run_id)
    assert [r.terms["frozen"] for r in rows] == [[], [0], [0]] and rows[1].terms["rolled_back"] == [0]
    final = load_set(run_id, store)
    for k, v in final[0].state_dict().items():  # model 0 kept epoch 1's weights
        assert torch.equal(v, snapshots[0][0][k]), k
    assert any(not torch.equal(v, snapshots[0][1][k]) for k, v in final[1].state_dict().items())


def test_old_databases_gain_the_terms_column(tmp_path) -> None:
    import sqlite3

    from deflect.store import Store

    path = tmp_path / "old.db"
    Store(path)
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE epochmetric DROP COLUMN terms")
        conn.execute("INSERT INTO run (id, created, updated, method, dataset, arch, preset, n, config, status, "
                     "device, run_dir, epochs_total, epochs_done, seconds) VALUES ('r1', '2026-01-01', '2026-01-01', "
                     "'disjoint', 'digits', 'cnn', 'digits', 2, '{}', 'finished', 'cpu', '/tmp/r1', 1, 1, 1.0)")
        conn.execute("INSERT INTO epochmetric (run_id, epoch, loss_total, loss_class, loss_angle, loss_transfer1, "
                     "loss_transfer2, val_loss, clean_acc, lr, seconds) VALUES ('r1', 1, 1, 1, 0, 0, 0, 1, '[90.0]', "
                     "0.1, 1.0)")
        conn.execute("PRAGMA user_version=1")
    store = Store(path)
    (row,) = store.epochs("r1")
    assert row.terms is None and row.clean_acc == [90.0]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


def test_an_unclamped_set_records_its_clamp_and_finite_terms(tmp_path) -> None:
    """`deflect train --transfer-clamp none`: the run's config says so, each epoch row carries both
    transfer terms, finite; a clamp the step does not know is one line and exit 2."""
    from typer.testing import CliRunner

    from deflect.cli import app
    from deflect.store import Store

    db = str(tmp_path / "u.db")
    args = ["train", "--n", "2", "--epochs", "2", "--limit", "256", "--db", db]
    done = CliRunner().invoke(app, [*args, "--transfer-clamp", "none", "--json"])
    assert done.exit_code == 0, done.output
    run = Store(db).latest_run()
    assert run is not None and run.config["transfer_clamp"] == "none" and run.status == "finished"
    rows = Store(db).epochs(run.id)
    assert len(rows) == 2 and all(r.terms is not None for r in rows)
    assert all(math.isfinite(r.terms[k]) for r in rows for k in ("transfer1", "transfer2"))  # type: ignore[index]
    bad = CliRunner().invoke(app, [*args, "--transfer-clamp", "never"])
    assert bad.exit_code == 2 and "--transfer-clamp must be 'batch', 'image' or 'none'" in bad.output
    assert len(Store(db).list_runs()) == 1


def test_a_smoothness_weight_stores_its_term_and_none_stores_none(store) -> None:
    """`--w-smooth` (TRS's term) is stored by name in every epoch row, positive and finite, and counted
    in the total; a run without it has no such term."""
    from deflect.train import train
    from tests.conftest import tiny_config

    with_term = store.epochs(train(tiny_config(epochs=2, w_smooth=0.5), store))
    assert len(with_term) == 2
    for row in with_term:
        assert row.terms is not None and math.isfinite(row.terms["smooth"]) and row.terms["smooth"] > 0
        assert row.terms["total"] >= row.terms["class"] + 0.5 * row.terms["smooth"] - 1e-6
    (plain,) = store.epochs(train(tiny_config(epochs=1), store))
    assert plain.terms is not None and "smooth" not in plain.terms
