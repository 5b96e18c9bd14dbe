"""The Python API as a notebook user meets it: exports, data and attacks of their own, no side effects."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torchattacks
from torch.utils.data import DataLoader, Subset, TensorDataset

import deflect
from deflect.attacks import Ensemble, make_attack
from deflect.config import TermWindow, make_config
from deflect.errors import DeflectError
from deflect.runtime import flushes_denormals
from deflect.store import HELPER_ROLE_KEY, Run, Store, utcnow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str]:
    """A small finished digits set of 3 (about 85 % clean accuracy, a few seconds)."""
    store = Store(tmp_path_factory.mktemp("api") / "deflect.db")
    run = deflect.train(make_config(n=3, dataset="digits", epochs=4, width=8), store)
    return store, run


def _tensors(data: deflect.data.ImageTensorDataset) -> TensorDataset:
    x, y = data[:]
    return TensorDataset(x, y)


def test_transfer_matrix_is_exported_and_takes_the_budget_of_the_datas_dataset(trained: tuple[Store, str]) -> None:
    store, run = trained
    models = deflect.load_set(run, store)
    test = deflect.load_dataset("digits", "test")
    res = deflect.transfer_matrix(models, test, "pgd1", limit=40)
    assert res.params["eps"] == make_attack("pgd1", "digits").eps == pytest.approx(0.15)
    assert res.params["eps"] != make_attack("pgd1").eps  # not CIFAR-10's 8/255
    with pytest.raises(DeflectError, match="needs dataset="):
        deflect.transfer_matrix(models, _tensors(test), "pgd1")
    assert "transfer_matrix" in deflect.__all__ and "ensemble_matrix" in deflect.__all__


def test_any_map_style_dataset_or_loader_gives_the_same_matrix(trained: tuple[Store, str]) -> None:
    store, run = trained
    models = deflect.load_set(run, store)
    test = deflect.load_dataset("digits", "test")
    fgsm = make_attack("fgsm", "digits")  # deterministic: the images alone decide the matrix
    ours = deflect.transfer_matrix(models, test, fgsm, limit=50, seed=3)
    plain = deflect.transfer_matrix(models, _tensors(test), fgsm, limit=50, seed=3)
    subset = deflect.transfer_matrix(models, Subset(test, list(range(len(test)))), fgsm, limit=50, seed=3)
    assert ours.n_examples == plain.n_examples == subset.n_examples == 50  # the same seeded 50 images
    assert ours.matrix == plain.matrix == subset.matrix and ours.clean == plain.clean
    loader = DataLoader(_tensors(test), batch_size=64)
    whole = deflect.transfer_matrix(models, loader, fgsm)
    assert whole.n_examples == len(test)
    assert whole.matrix == deflect.transfer_matrix(models, test, fgsm).matrix
    assert deflect.transfer_matrix(models, test, fgsm, limit=np.int64(50), seed=3).matrix == ours.matrix
    with pytest.raises(DeflectError, match="pass the dataset itself"):
        deflect.transfer_matrix(models, loader, fgsm, limit=50)
    for bad in (0, -1):
        with pytest.raises(DeflectError, match="batch_size must be"):
            deflect.transfer_matrix(models, test, fgsm, batch_size=bad)
    with pytest.raises(DeflectError, match="steps"):
        deflect.evaluate.eps_sweep(models, test, [0.1], steps=0)


def test_a_plain_callable_attack_runs_under_the_contract(trained: tuple[Store, str]) -> None:
    """A torchattacks attack built per call gives what deflect's own attack gives on the same models."""
    store, run = trained
    models = deflect.load_set(run, store)
    test = deflect.load_dataset("digits", "test")
    ours = make_attack("fgsm", "digits")

    def their_fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torchattacks.FGSM(model, eps=ours.eps)(x, y)

    theirs = deflect.transfer_matrix(models, test, their_fgsm, limit=60)
    mine = deflect.transfer_matrix(models, test, ours, limit=60)
    assert theirs.attack == "their_fgsm"
    np.testing.assert_allclose(theirs.matrix, mine.matrix, atol=100 / 60 + 1e-9)  # at most one image apart
    assert all(theirs.matrix[i][i] < theirs.clean[i] for i in range(3))  # white-box, it bites
    ens = deflect.ensemble_matrix(models, test, their_fgsm, 2, limit=30)  # a pair reaches it as one model
    assert len(ens.subsets) == 3 and ens.n_examples == 30
    with pytest.raises(DeflectError, match="must be a name, an Attack or a callable"):
        deflect.transfer_matrix(models, test, 42)  # type: ignore[arg-type]


def test_an_ensemble_leaves_its_members_in_eval_mode_under_torchattacks(trained: tuple[Store, str]) -> None:
    store, run = trained
    models = deflect.load_set(run, store)
    x, y = deflect.load_dataset("digits", "test")[:32]
    ens = Ensemble(models[:2])
    assert not ens.training
    torchattacks.PGD(ens, eps=0.15, alpha=0.03, steps=2)(x, y)
    assert not any(m.training for m in models) and not ens.training


def test_library_calls_leave_the_callers_float_settings_alone(trained: tuple[Store, str]) -> None:
    store, run = trained
    models = deflect.load_set(run, store)
    test = deflect.load_dataset("digits", "test")
    assert not flushes_denormals()
    deflect.transfer_matrix(models, test, "fgsm", limit=10)
    assert not flushes_denormals() and (torch.tensor([1e-39]) * 1.0).item() > 0
    torch.set_flush_denormal(True)
    try:
        deflect.transfer_matrix(models, test, "fgsm", limit=10)
        assert flushes_denormals()  # the caller's own choice is kept too
    finally:
        torch.set_flush_denormal(False)


def test_make_config_refuses_unknown_or_mistyped_settings() -> None:
    with pytest.raises(DeflectError, match="unknown setting.*lr.*widht"):
        make_config(3, "digits", widht=4, lr=0.1)
    with pytest.raises(DeflectError, match="angle_window must be a TermWindow"):
        make_config(2, "digits", angle_window=(1, 2))
    assert make_config(2, "digits", angle_window=TermWindow(1, 2)).angle_window == TermWindow(1, 2)
    assert deflect.TrainConfig(n=3).preset == "custom"  # a hand-built config is not the digits preset


def _stub(store: Store, run_id: str, status: str, age: int, **config: object) -> None:
    store.add_run(Run(id=run_id, method="disjoint", dataset="digits", arch="cnn", preset="digits", n=3,
                      config=dict(config), status=status, run_dir=str(store.path.parent / "runs" / run_id),
                      created=utcnow() - timedelta(seconds=age)))


def test_latest_is_the_newest_finished_run_and_helpers_never_make_a_prefix_ambiguous(tmp_path: Path) -> None:
    store = Store(tmp_path / "x.db")
    with pytest.raises(DeflectError, match="no runs in"):
        store.get_run("latest")
    _stub(store, "digits-disjoint-n3-failed", "failed", 5)
    with pytest.raises(DeflectError, match="no finished run.*digits-disjoint-n3-failed \\(failed\\)"):
        store.get_run("latest")
    _stub(store, "digits-disjoint-n3-aaaaaa", "finished", 30)
    _stub(store, "digits-disjoint-n3-bbbbbb", "interrupted", 1)
    assert store.get_run("latest").id == "digits-disjoint-n3-aaaaaa"
    _stub(store, "digits-disjoint-n3-helper", "finished", 0, **{HELPER_ROLE_KEY: "static-adversary"})
    assert store.get_run("latest").id == "digits-disjoint-n3-aaaaaa"
    assert store.get_run("digits-disjoint-n3-h").id == "digits-disjoint-n3-helper"  # named, it is found
    with pytest.raises(DeflectError, match="ambiguous"):
        store.get_run("digits-disjoint-n3")  # three of the user's own runs share it


def test_loading_never_creates_a_database_or_reads_a_path_as_a_run_id(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    with pytest.raises(DeflectError, match="no database at"):
        deflect.load_set("latest", missing)
    assert not missing.exists()
    with pytest.raises(DeflectError, match="no run directory"):
        deflect.load_set(tmp_path / "runs" / "gone")


def test_dataset_slices_are_batches() -> None:
    test = deflect.load_dataset("digits", "test")
    x, y = test[:4]
    assert x.shape == (4, 1, 8, 8) and y.dtype == torch.long
    assert torch.equal(x, test.batch(torch.arange(4))[0]) and torch.equal(y, test.labels[:4])
