"""Datasets as in-memory image tensors in [0,1].

Every dataset deflect trains on fits in memory, so they are held as one uint8/float tensor and
batched by index: that is faster than a DataLoader on 2 CPU cores and lets the training loop draw
batches from a seeded generator (exact resume). The train/validation split is carved from the
training data with a fixed seed, so method choices are made on validation and never on test.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deflect.errors import DeflectError

__all__ = ["DATASETS", "DatasetInfo", "ImageTensorDataset", "dataset_info", "load_dataset", "split_indices"]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")
SPLITS = ("train", "val", "test", "train-full")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
VAL_SEED = 2  # the official code splits CIFAR-10 45k/5k with random_split seed 2


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: shape, classes and normalisation constants."""

    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_fraction: float
    train_images: int  # the full training set (before the validation split), for sizing epochs

    @property
    def train_split_images(self) -> int:
        """Images in the `train` split (the training set less its validation part)."""
        return self.train_images - max(1, int(round(self.train_images * self.val_fraction)))


INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, 8, 10, (0.3054,), (0.3761,), 0.1, 1437),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), 1 / 12, 60000),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), 1 / 12, 60000),
    "cifar10": DatasetInfo(
        "cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), 0.1, 50000
    ),
}


class ImageTensorDataset(Dataset):
    """Images (N×C×H×W, uint8 0..255 or float 0..1) and int64 labels; items are float in [0,1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if images.shape[0] != labels.shape[0]:
            raise DeflectError(f"{info.name}: {images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.long()
        self.info = info

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int | slice) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor]:
        """One item (image, int label), or for a slice a batch (images, label tensor) as `batch` gives."""
        if isinstance(index, slice):
            return _to_float(self.images[index]), self.labels[index]
        return _to_float(self.images[index]), int(self.labels[index])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather a batch by index tensor: float images in [0,1] and labels."""
        return _to_float(self.images[index]), self.labels[index]

    def subset(self, index: torch.Tensor) -> ImageTensorDataset:
        return ImageTensorDataset(self.images[index], self.labels[index], self.info)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def dataset_info(name: str) -> DatasetInfo:
    if name not in INFO:
        raise DeflectError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return INFO[name]


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = False
) -> ImageTensorDataset:
    """Load a dataset split as `(float C×H×W in [0,1], label)` items.

    Splits: `train` (training data minus the validation part), `val` (held out from training,
    seeded), `train-full` (all training data) and `test`.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise DeflectError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    train_part = split != "test"
    if name == "digits":
        images, labels = _digits(train_part)
    elif name == "fashion-mnist":
        images, labels = _fashion_mnist(train_part, data_dir, download)
    else:
        images, labels = _torchvision(name, train_part, data_dir, download)
    full = ImageTensorDataset(images, labels, info)
    if split in ("test", "train-full"):
        return full
    train_idx, val_idx = split_indices(len(full), info.val_fraction)
    return full.subset(train_idx if split == "train" else val_idx)


def split_indices(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation split of `n` training examples."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _digits(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits (1797 images, 17 grey levels), split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    x, y = (x_tr, y_tr) if train else (x_te, y_te)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DeflectError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DeflectError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in ("", ".gz"):
            candidate = root / sub / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _fashion_mnist(
    train: bool, data_dir: str | os.PathLike | None, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from the Debian package's idx files, or a torchvision root."""
    prefix = "train" if train else "t10k"
    roots = [Path(data_dir)] if data_dir else []
    roots.append(DEBIAN_FASHION_MNIST)
    for root in roots:
        img = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        lab = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if img and lab:
            images = torch.from_numpy(_read_idx(img).copy())[:, None]
            return images, torch.from_numpy(_read_idx(lab).astype(np.int64))
    if download and data_dir:
        return _torchvision("fashion-mnist", train, data_dir, download)
    raise DeflectError(
        "Fashion-MNIST not found: install it with 'apt-get install dataset-fashion-mnist' "
        f"(reads {DEBIAN_FASHION_MNIST}) or pass --data-dir DIR --download"
    )


def _torchvision(
    name: str, train: bool, data_dir: str | os.PathLike | None, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST / CIFAR-10 (and Fashion-MNIST as fallback) through torchvision's loaders."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "fashion-mnist": datasets.FashionMNIST}[
        name
    ]
    root = Path(data_dir) if data_dir else Path("data")
    try:
        ds = cls(root=str(root), train=train, download=download)
    except (RuntimeError, OSError) as exc:
        hint = "" if download else " (--download, or download=True in Python, fetches it)"
        raise DeflectError(f"{name} not found under {root}{hint}: {str(exc).splitlines()[0]}") from exc
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
    images = data[:, None] if data.ndim == 3 else data.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
