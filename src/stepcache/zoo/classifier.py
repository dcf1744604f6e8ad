"""Domain classifiers: read generated samples as classes (accuracy) and as features (FD, KID).

digits: logistic regression fit on 1,400 real digits at call time (a second; nothing shipped).
fmnist: a small CNN trained on the Fashion-MNIST training set and shipped as safetensors; its
128-d penultimate layer is the feature space of ``FD-domain``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._io import atomic_write_json

WEIGHTS = Path(__file__).parent / "weights"


class FashionCNN(nn.Module):
    """Two conv blocks and a 128-d feature layer; input (N, 1, 28, 28) in [0, 1]."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) images in [0, 1] (what pipelines return) to a float (N, C, H, W) tensor."""
    t = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    return t.permute(0, 3, 1, 2).contiguous() if t.dim() == 4 and t.shape[-1] in (1, 3) else t


def train_fashion_classifier(
    out_dir: str | Path,
    epochs: int = 3,
    batch_size: int = 128,
    seed: int = 0,
    limit_images: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    from .data import load_fashion_mnist

    torch.manual_seed(seed)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    if limit_images is not None:
        x, y, xt, yt = x[:limit_images], y[:limit_images], xt[:limit_images], yt[:limit_images]
    x, xt = (x + 1) / 2, (xt + 1) / 2
    model = FashionCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t0, done = time.perf_counter(), 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            batch = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # clothes are left-right symmetric
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if progress is not None:
                progress(done, steps)
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    info = {"test_accuracy": acc, "epochs": epochs, "train_seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "classifier.json", info)
    return info


class DomainClassifier:
    """``predict`` labels and ``features`` for images (N, H, W, C) in [0, 1]."""

    def __init__(self, key: str, model: Any, feature_net: nn.Module | None, info: dict[str, Any]):
        self.key, self.model, self.feature_net, self.info = key, model, feature_net, info

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(self.model, nn.Module):
            with torch.no_grad():
                return self.model(_to_nchw(images)).argmax(1).numpy()
        return self.model.predict(np.asarray(images).reshape(len(images), -1))

    def accuracy(self, images: np.ndarray | torch.Tensor, labels: list[int] | np.ndarray) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())

    def features(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.feature_net is None:
            raise ValueError(f"the {self.key} classifier has no feature layer")
        with torch.no_grad():
            return self.feature_net.features(_to_nchw(images))


def _digits_classifier() -> DomainClassifier:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    train_idx, test_idx = order[:1400], order[1400:]
    clf = LogisticRegression(max_iter=2000).fit(data.data[train_idx] / 16, data.target[train_idx])
    acc = float(clf.score(data.data[test_idx] / 16, data.target[test_idx]))
    return DomainClassifier("digits", clf, None, {"test_accuracy": acc, "kind": "logistic regression"})


def _fashion_classifier(weights_dir: Path | None = None) -> DomainClassifier:
    d = weights_dir or WEIGHTS / "fmnist-classifier"
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{d / 'model.safetensors'} is missing; train it with benchmarks/train_classifier.py"
        )
    model = FashionCNN()
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    model.eval().requires_grad_(False)
    info = json.loads((d / "classifier.json").read_text())
    return DomainClassifier("fmnist", model, model, info)


def classifier_for(zoo_key: str) -> DomainClassifier:
    """The domain classifier of a zoo model's dataset."""
    if zoo_key.startswith("digits"):
        return _digits_classifier()
    if zoo_key.startswith("fmnist"):
        return _fashion_classifier()
    raise KeyError(f"no domain classifier for {zoo_key!r}")
