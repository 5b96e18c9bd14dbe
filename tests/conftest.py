"""Shared fixtures: a fresh database per test and a tiny, fast digits configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deflect.config import TrainConfig, make_config
from deflect.store import Store


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread for the whole session, set once here rather than by tests that pin it and
    may not restore it: every test then sees the same thread count whatever ran before it, and
    tests that compare with a one-thread process (the distributed workers) get it for free."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own working directory, database and run folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEFLECT_DB", str(tmp_path / "deflect.db"))
    monkeypatch.delenv("DEFLECT_RUNS", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "deflect.db")


def tiny_config(**overrides: object) -> TrainConfig:
    """Two small models on 320 digits images: a few seconds per run."""
    values: dict[str, object] = dict(epochs=2, train_limit=320, batch_size=64, width=8)
    values.update(overrides)
    n = int(values.pop("n", 2))  # type: ignore[arg-type]
    return make_config(n=n, dataset="digits", **values)


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, dict[str, str]]:
    """The default digits recipe (`deflect train --n 3`), disjoint and independent, trained once."""
    from deflect.train import train

    root = tmp_path_factory.mktemp("digits-runs")
    store = Store(root / "deflect.db")
    ids = {method: train(make_config(n=3, dataset="digits", method=method), store)
           for method in ("disjoint", "independent")}
    return store, ids
