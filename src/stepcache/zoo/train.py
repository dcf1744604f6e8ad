"""The fast training recipe shared by the zoo's class-conditional models.

Rectified flow (x_t = (1-s) x0 + s noise, predict noise - x0) with logit-normal s, 10% null
labels for classifier-free guidance, AdamW with linear warm-up and cosine decay, gradient
clipping, and an EMA of the weights (the EMA is what ships). Resumable from a safetensors
checkpoint that holds weights, EMA, optimizer state and the data RNG.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write_json
from .models import MODELS, TrainConfig, ZooModel, build


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def flow_matching_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    null: int,
    cfg_dropout: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Rectified-flow loss; ``cond`` is class labels (long) or caption embeddings (float)."""
    b = x0.shape[0]
    s = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal: more weight mid-trajectory
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(b, generator=gen) < cfg_dropout
    sv = s.view(-1, 1, 1, 1)
    x_t = (1 - sv) * x0 + sv * noise
    if cond.dtype == torch.long:
        labels = torch.where(drop, torch.full_like(cond, null), cond)
        pred = model(x_t, timestep=s * 1000, class_labels=labels).sample
    else:  # text: the null caption is the zero embedding
        emb = torch.where(drop.view(-1, 1), torch.zeros_like(cond), cond)[:, None, :]
        pred = text_model_call(model, x_t, s * 1000, emb)
    return torch.nn.functional.mse_loss(pred, noise - x0)


def text_model_call(
    model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor
) -> torch.Tensor:
    return model(
        x, encoder_hidden_states=emb, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}
    ).sample


def train(
    key: str,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    resume: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train zoo model ``key`` into ``out_dir`` (model.safetensors, config.json, train.json).

    Resumes from ``out_dir/checkpoint.safetensors`` when present (written every
    ``cfg.checkpoint_every`` steps) and gives the same weights as an uninterrupted run.
    ``init_from`` (a folder with model.safetensors of this model) starts the weights and their
    EMA there instead of at random, with a fresh optimizer and schedule: a continued run.
    """
    if key not in MODELS:
        raise KeyError(f"unknown zoo model {key!r}; available: {', '.join(MODELS)}")
    spec = MODELS[key]
    cfg = cfg or copy.deepcopy(spec.train)
    if init_from is not None:
        check_init(spec, Path(init_from))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    images, labels = spec.load_data()
    if cfg.limit_images is not None:
        images, labels = images[: cfg.limit_images], labels[: cfg.limit_images]
    model = build(spec.family, spec.config)
    # Eval mode throughout: diffusers' DiT would otherwise drop labels independently in every
    # block; we drop them once per sample below. No layer here uses dropout.
    model.eval()
    if init_from is not None:
        _load_init(model, spec, Path(init_from))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, elapsed = 0, 0.0
    ckpt = out / "checkpoint.safetensors"
    if resume and ckpt.exists():
        start, elapsed = _load_checkpoint(ckpt, model, ema, opt, gen, cfg, _origin(init_from))
    null = spec.num_classes
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
            _save_checkpoint(
                ckpt,
                model,
                ema,
                opt,
                gen,
                step + 1,
                elapsed + time.perf_counter() - t0,
                cfg,
                _origin(init_from),
            )
    elapsed += time.perf_counter() - t0
    save_weights(spec, ema, out)
    ckpt.unlink(missing_ok=True)
    info = {
        "model": key,
        "train": asdict(cfg),
        "train_seconds": round(elapsed, 1),
        "final_loss": loss_val,
        "torch_threads": torch.get_num_threads(),
    }
    if init_from is not None:
        info["init_from"] = _describe_init(Path(init_from))
    atomic_write_json(out / "train.json", info)
    return info


def save_weights(spec: ZooModel, model: torch.nn.Module, out: Path) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / "model.safetensors")
    atomic_write_json(
        out / "config.json",
        {
            "key": spec.key,
            "family": spec.family,
            "model": spec.config,
            "num_classes": spec.num_classes,
            "conditioning": spec.conditioning,
            "scheduler": spec.scheduler,
            "default_steps": spec.default_steps,
            "default_guidance": spec.default_guidance,
        },
    )


def check_init(spec: ZooModel, src: Path) -> None:
    """Refuse ``init_from`` weights that are missing or of another architecture (ValueError)."""
    if not (src / "model.safetensors").is_file():
        raise ValueError(f"--init-from {src}: no model.safetensors there")
    config = src / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model") != spec.config:
        raise ValueError(f"--init-from {src}: its config.json is not {spec.key}'s architecture")


def _load_init(model: torch.nn.Module, spec: ZooModel, src: Path) -> None:
    path = src / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:  # missing or mis-shaped tensors
        raise ValueError(
            f"--init-from {src}: weights do not fit {spec.key}: {str(e).splitlines()[0]}"
        ) from None


def _describe_init(src: Path) -> dict[str, Any]:
    """Where a continued run started: the earlier run's train.json (its settings and time)."""
    prior = src / "train.json"
    return {"weights": src.name, "prior": json.loads(prior.read_text()) if prior.is_file() else None}


_RESUME_FIELDS = ("batch_size", "lr", "warmup", "ema", "cfg_dropout", "seed", "limit_images")


def _origin(init_from: str | Path | None) -> str:
    """Where a run's weights started, as a checkpoint records it ("" for random)."""
    return "" if init_from is None else str(Path(init_from).resolve())


def _save_checkpoint(
    path: Path, model, ema, opt, gen, step: int, elapsed: float, cfg: TrainConfig, origin: str = ""
) -> None:
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
    meta = {"step": str(step), "elapsed": str(elapsed), "train": json.dumps(asdict(cfg)), "init_from": origin}
    tmp = path.with_name(".checkpoint.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def _load_checkpoint(
    path: Path, model, ema, opt, gen, cfg: TrainConfig, origin: str = ""
) -> tuple[int, float]:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    saved = json.loads(meta.get("train", "{}"))
    changed = [k for k in _RESUME_FIELDS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise ValueError(
            f"{path} was written with other training settings ({', '.join(changed)}); "
            "delete it or pass --no-resume to start over"
        )
    if meta.get("init_from", "") != origin:
        started = meta.get("init_from") or "random weights"
        raise ValueError(
            f"{path} belongs to a run started from {started}, not from {origin or 'random weights'}; "
            "delete it or pass --no-resume to start over"
        )
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


def load_weights(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = json.loads((model_dir / "config.json").read_text())
    model = build(config.get("family", "dit"), config["model"])
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model.eval().requires_grad_(False), config


__all__ = ["TrainConfig", "load_weights", "train"]
