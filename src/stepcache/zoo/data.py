"""Offline training data: scikit-learn's digits and Fashion-MNIST from Debian's package."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataMissingError(FileNotFoundError):
    """Training or reference data is not installed; the message gives the install command."""


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 digits in [-1, 1], shape (1797, 1, 8, 8), labels 0-9; bundled with scikit-learn."""
    from sklearn.datasets import load_digits as _load

    data = _load()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0 * 2 - 1
    return images[:, None], torch.tensor(data.target, dtype=torch.long)


def fmnist_dir() -> Path:
    return Path(os.environ.get("STEPCACHE_FMNIST_DIR", FMNIST_DIR))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise ValueError(f"{path}: expected {count} values for shape {dims}, found {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST in [-1, 1], shape (N, 1, 28, 28), labels 0-9 (60,000 train / 10,000 test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    root = fmnist_dir()
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DataMissingError(
            f"Fashion-MNIST not found in {root}; install it with `{FMNIST_INSTALL}` "
            "(or point STEPCACHE_FMNIST_DIR at a folder with the four idx .gz files)"
        )
    images = _read_idx(images_path)
    labels = _read_idx(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0 * 2 - 1)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))
