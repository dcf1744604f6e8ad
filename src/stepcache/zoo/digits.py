"""digits-dit: a class-conditional DiT trained by flow matching on scikit-learn's bundled 8x8 digits.

Seconds to train on a CPU; the unit-test model. The recipe (shared with larger zoo models):
rectified flow (x_t = (1-s) x0 + s noise, predict noise - x0), logit-normal s, 10% null labels
for classifier-free guidance, AdamW with warm-up and cosine decay, EMA of the weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from .._io import atomic_write_json

MODEL_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
    "norm_num_groups": 1,
}
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 192
    lr: float = 2e-3
    warmup: int = 100
    ema: float = 0.995
    cfg_dropout: float = 0.1
    seed: int = 0
    limit_images: int | None = None  # train on the first N images (tests)
    checkpoint_every: int = 500


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1], shape (N, 1, 8, 8), and labels 0-9; bundled with scikit-learn, no network."""
    from sklearn.datasets import load_digits as _load

    data = _load()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0 * 2 - 1
    return images[:, None], torch.tensor(data.target, dtype=torch.long)


def build_model() -> DiTTransformer2DModel:
    return DiTTransformer2DModel(**MODEL_CONFIG)


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def flow_matching_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    null: int,
    cfg_dropout: float,
    gen: torch.Generator,
) -> torch.Tensor:
    b = x0.shape[0]
    s = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal: more weight mid-trajectory
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(b, generator=gen) < cfg_dropout
    labels = torch.where(drop, torch.full_like(labels, null), labels)
    sv = s.view(-1, 1, 1, 1)
    x_t = (1 - sv) * x0 + sv * noise
    pred = model(x_t, timestep=s * 1000, class_labels=labels).sample
    return torch.nn.functional.mse_loss(pred, noise - x0)


def train(
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    resume: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train digits-dit into ``out_dir`` (model.safetensors + config.json); resumes from its checkpoint."""
    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    images, labels = load_digits()
    if cfg.limit_images is not None:
        images, labels = images[: cfg.limit_images], labels[: cfg.limit_images]
    model = build_model().train()
    # diffusers' DiT drops labels per block in train mode; we drop them once per sample ourselves.
    model.eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, elapsed = 0, 0.0
    ckpt = out / "checkpoint.safetensors"
    if resume and ckpt.exists():
        start, elapsed = _load_checkpoint(ckpt, model, ema, opt, gen)
    null = int(MODEL_CONFIG["num_embeds_ada_norm"])
    t0 = time.perf_counter()
    loss_val = float("nan")
    for step in range(start, cfg.steps):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        loss = flow_matching_loss(model, images[idx], labels[idx], null, cfg.cfg_dropout, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        loss_val = float(loss.detach())
        if progress is not None:
            progress(step + 1, cfg.steps, loss_val)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, model, ema, opt, gen, step + 1, elapsed + time.perf_counter() - t0)
    elapsed += time.perf_counter() - t0
    save_weights(ema, out)
    ckpt.unlink(missing_ok=True)
    info = {
        "train": asdict(cfg),
        "train_seconds": round(elapsed, 1),
        "final_loss": loss_val,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(out / "train.json", info)
    return info


def save_weights(model: torch.nn.Module, out: Path) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / "model.safetensors")
    atomic_write_json(
        out / "config.json",
        {
            "model": MODEL_CONFIG,
            "scheduler": SCHEDULER_CONFIG,
            "default_steps": DEFAULT_STEPS,
            "default_guidance": DEFAULT_GUIDANCE,
        },
    )


def _save_checkpoint(path: Path, model, ema, opt, gen, step: int, elapsed: float) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().contiguous().clone()
    for k, v in ema.state_dict().items():
        tensors[f"ema.{k}"] = v.detach().contiguous().clone()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"opt.{names[id(p)]}.{key}"] = val.detach().contiguous().clone()
    tensors["rng"] = gen.get_state()
    meta = {"step": str(step), "elapsed": str(elapsed)}
    tmp = path.with_name(".checkpoint.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def _load_checkpoint(path: Path, model, ema, opt, gen) -> tuple[int, float]:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = dict(model.named_parameters())
    # Rebuild Adam's state; "step" is a tensor in torch's AdamW.
    for key, val in tensors.items():
        if key.startswith("opt."):
            name, field = key[4:].rsplit(".", 1)
            opt.state[params[name]][field] = val
    gen.set_state(tensors["rng"])
    return int(meta["step"]), float(meta["elapsed"])


def domain_classifier() -> Any:
    """A logistic-regression digit classifier fit on 1,400 of the real digits (the rest held out).

    Returns (classifier, held-out accuracy on real digits).
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.linear_model import LogisticRegression

    data = _load()
    order = np.random.default_rng(0).permutation(len(data.target))
    train_idx, test_idx = order[:1400], order[1400:]
    clf = LogisticRegression(max_iter=2000).fit(data.data[train_idx] / 16, data.target[train_idx])
    return clf, float(clf.score(data.data[test_idx] / 16, data.target[test_idx]))


def class_accuracy(images: np.ndarray, labels: list[int], classifier: Any | None = None) -> float:
    """Fraction of generated images (N, 8, 8, 1) in [0, 1] that the classifier reads as their label."""
    clf = classifier if classifier is not None else domain_classifier()[0]
    return float(clf.score(np.asarray(images).reshape(len(labels), -1), np.asarray(labels)))


def load_weights(model_dir: Path) -> tuple[DiTTransformer2DModel, dict[str, Any]]:
    config = json.loads((model_dir / "config.json").read_text())
    model = DiTTransformer2DModel(**config["model"])
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model.eval().requires_grad_(False), config


__all__ = [
    "TrainConfig",
    "build_model",
    "class_accuracy",
    "domain_classifier",
    "load_digits",
    "load_weights",
    "train",
]
