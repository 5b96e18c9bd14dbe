"""Datasets: shapes, ranges, splits, the IDX reader and missing-data errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from deflect.data import INFO, load_dataset
from deflect.errors import DeflectError
from deflect.models import build_model


def test_digits_splits_are_disjoint_and_in_range() -> None:
    train, val, test, full = (load_dataset("digits", s) for s in ("train", "val", "test", "train-full"))
    assert len(train) + len(val) == len(full) and len(test) == 360
    x, label = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= label < 10
    xs, _ = full.batch(torch.arange(len(full)))
    assert xs.min() >= 0 and xs.max() <= 1
    tr = {tuple(v.flatten().tolist()) for v in train.images}
    assert not any(tuple(v.flatten().tolist()) in tr for v in val.images[:20] if (v.sum() > 0))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 24), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    test = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert len(test) == 6 and test[0][0].shape == (1, 28, 28)
    assert len(load_dataset("fashion-mnist", "train", data_dir=tmp_path)) == 22  # 1/12 held out


def test_truncated_idx_is_an_error(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x01")
    with pytest.raises(DeflectError, match="truncated"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_missing_datasets_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DeflectError, match="--download"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    with pytest.raises(DeflectError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DeflectError, match="unknown split"):
        load_dataset("digits", "dev")


def test_models_normalise_inside() -> None:
    model = build_model("cnn", INFO["digits"])
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(INFO["digits"].mean))
    raw = build_model("preact-resnet18", INFO["cifar10"], normalize=False)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(raw.normalize(x), x)
    assert raw(x).shape == (2, 10)


def test_debian_fashion_mnist_when_installed() -> None:
    from deflect.data import DEBIAN_FASHION_MNIST

    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    test = load_dataset("fashion-mnist", "test")
    assert len(test) == 10_000 and test.images.shape == (10_000, 1, 28, 28)
    assert sorted(torch.bincount(test.labels).tolist()) == [1000] * 10
    assert len(load_dataset("fashion-mnist", "train")) + len(load_dataset("fashion-mnist", "val")) == 60_000
