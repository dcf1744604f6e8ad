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
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import UnreadableFileError, atomic_write_json, read_limited
from .captions import CaptionBatch, caption_model_call
from .models import MODELS, TrainConfig, ZooModel, build

# What a training run writes into its folder; the dot files are the temporaries renamed into place.
TRAIN_FILES = (
    "model.safetensors",
    "config.json",
    "train.json",
    "checkpoint.safetensors",
    ".model.safetensors.tmp",
    ".checkpoint.tmp",
)
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_WEIGHTS_BYTES = 1024**3  # the zoo's models are a few MB
MAX_CHECKPOINT_BYTES = 4 * 1024**3  # weights, their EMA and two Adam moments


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def flow_matching_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor | CaptionBatch,
    null: int,
    cfg_dropout: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Rectified-flow loss; ``cond`` is class labels (long) or caption embeddings (float)."""
    b = x0.shape[0]
    s = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal: more weight mid-trajectory
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(b, generator=gen) < cfg_dropout
    sv = s.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - sv) * x0 + sv * noise
    if isinstance(cond, CaptionBatch):  # per-token captions; the null caption is all zeros
        pred = caption_model_call(model, x_t, s * 1000, cond.dropped(drop))
    elif cond.dtype == torch.long:
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
    # Wall seconds, and process CPU seconds (counted from step ``cpu_from``: a checkpoint written
    # before CPU was counted resumes with the count starting there).
    start, elapsed, cpu, cpu_from = 0, 0.0, 0.0, 0
    ckpt = out / "checkpoint.safetensors"
    if resume and os.path.lexists(ckpt):
        start, elapsed, cpu, cpu_from = _load_checkpoint(ckpt, model, ema, opt, gen, cfg, _origin(init_from))
    null = spec.num_classes
    t0, c0 = time.perf_counter(), time.process_time()
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
                cpu=(cpu + time.process_time() - c0, cpu_from),
            )
    elapsed += time.perf_counter() - t0
    cpu += time.process_time() - c0
    save_weights(spec, ema, out)
    ckpt.unlink(missing_ok=True)
    info = {
        "model": key,
        "train": asdict(cfg),
        "train_seconds": round(elapsed, 1),
        "train_cpu_seconds": round(cpu, 1),
        "cpu_counted_from_step": cpu_from,
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


def _read_json(path: Path, what: str) -> Any:
    """A small JSON file given by the user (ValueError naming it when it cannot be read)."""
    data = read_limited(path, MAX_JSON_BYTES, what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _safetensors(path: Path, max_bytes: int, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; ValueError naming it for anything else (a
    pickle, a ``torch.save`` file, garbage)."""
    from safetensors.torch import load

    data = read_limited(path, max_bytes, what)
    try:
        tensors = load(data)
        # load() has checked the header: 8 bytes of its length, then JSON.
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except Exception as e:  # the parser's errors on hostile bytes are not one documented type
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a safetensors file ({detail})") from None
    return tensors, meta


def _read_weights(spec: ZooModel, src: Path) -> dict[str, torch.Tensor]:
    """``src/model.safetensors``, checked to fit ``spec``'s architecture tensor by tensor."""
    path = src / "model.safetensors"
    if not os.path.lexists(path):
        raise ValueError(f"--init-from {src}: no model.safetensors there")
    try:
        tensors, _ = _safetensors(path, MAX_WEIGHTS_BYTES, "model.safetensors")
    except ValueError as e:
        raise ValueError(f"--init-from {e}") from None
    wanted = {k: tuple(v.shape) for k, v in build(spec.family, spec.config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(wanted) - set(got))
    extra = sorted(set(got) - set(wanted))
    misfit = sorted(k for k in set(wanted) & set(got) if wanted[k] != got[k])
    bad_type = sorted(k for k, v in tensors.items() if k in wanted and not v.is_floating_point())
    if missing or extra or misfit or bad_type:
        what = [
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", extra),
                ("mis-shaped", misfit),
                ("not floating point", bad_type),
            )
            if keys
        ]
        raise ValueError(f"--init-from {path}: weights do not fit {spec.key} ({'; '.join(what)})")
    return tensors


def check_init(spec: ZooModel, src: Path) -> None:
    """Refuse ``init_from`` weights that are missing, unreadable or of another architecture
    (ValueError starting with ``--init-from`` and naming the file)."""
    if not src.is_dir():
        why = "not a folder" if os.path.lexists(src) else "no such folder"
        raise ValueError(f"--init-from {src}: no model.safetensors there ({why})")
    for name in ("config.json", "train.json"):
        path = src / name
        if not os.path.lexists(path):
            continue
        try:
            doc = _read_json(path, name)
        except ValueError as e:
            raise ValueError(f"--init-from {e}") from None
        if name == "config.json" and not isinstance(doc, dict):
            raise ValueError(f"--init-from {path}: expected a JSON object, got {type(doc).__name__}")
        if name == "config.json" and doc.get("model") != spec.config:
            raise ValueError(f"--init-from {src}: its config.json is not {spec.key}'s architecture")
    _read_weights(spec, src)


def _load_init(model: torch.nn.Module, spec: ZooModel, src: Path) -> None:
    tensors = _read_weights(spec, src)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # missing or mis-shaped tensors
        raise ValueError(
            f"--init-from {src}: weights do not fit {spec.key}: {str(e).splitlines()[0]}"
        ) from None


def _describe_init(src: Path) -> dict[str, Any]:
    """Where a continued run started: the earlier run's train.json (its settings and time)."""
    prior = src / "train.json"
    try:  # check_init read it before the training; only a file changed since can fail here
        record = _read_json(prior, "train.json") if os.path.lexists(prior) else None
    except ValueError:
        record = None
    return {"weights": src.name, "prior": record}


_RESUME_FIELDS = ("batch_size", "lr", "warmup", "ema", "cfg_dropout", "seed", "limit_images")


def _origin(init_from: str | Path | None) -> str:
    """Where a run's weights started, as a checkpoint records it ("" for random)."""
    return "" if init_from is None else str(Path(init_from).resolve())


def _save_checkpoint(
    path: Path,
    model,
    ema,
    opt,
    gen,
    step: int,
    elapsed: float,
    cfg: TrainConfig,
    origin: str = "",
    cpu: tuple[float, int] = (0.0, 0),
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
    meta = {
        "step": str(step),
        "elapsed": str(elapsed),
        "cpu": str(cpu[0]),
        "cpu_from": str(cpu[1]),
        "train": json.dumps(asdict(cfg)),
        "init_from": origin,
    }
    tmp = path.with_name(".checkpoint.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def _unusable(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: not a usable checkpoint ({why}); delete it or pass --no-resume to start over")


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's tensors and its metadata, decoded and checked (ValueError naming it)."""
    try:
        tensors, meta = _safetensors(path, MAX_CHECKPOINT_BYTES, "checkpoint")
    except UnreadableFileError as e:
        raise _unusable(path, str(e).removeprefix(f"{path}: ")) from None
    except ValueError:
        raise _unusable(path, "not a safetensors file") from None
    try:
        step, elapsed = int(meta["step"]), float(meta["elapsed"])
        cpu, cpu_from = float(meta.get("cpu", 0.0)), int(meta.get("cpu_from", step))
        train = json.loads(meta.get("train", "{}"))
    except (KeyError, TypeError, ValueError, RecursionError):
        raise _unusable(path, "no step, time or settings in its metadata") from None
    if step < 0 or not math.isfinite(elapsed) or not math.isfinite(cpu) or not 0 <= cpu_from <= step:
        raise _unusable(path, "its step, time or settings are out of range")
    if not isinstance(train, dict):
        raise _unusable(path, "its step, time or settings are out of range")
    rng = tensors.get("rng")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise _unusable(path, "no random-number state")
    return tensors, {
        "step": step,
        "elapsed": elapsed,
        "cpu": cpu,
        "cpu_from": cpu_from,
        "train": train,
        "init_from": meta.get("init_from", ""),
    }


def check_checkpoint(path: Path) -> None:
    """Refuse, before any training, a checkpoint that cannot be resumed from (ValueError naming it);
    no checkpoint there is fine."""
    if os.path.lexists(path):
        _read_checkpoint(path)


def _load_checkpoint(
    path: Path, model, ema, opt, gen, cfg: TrainConfig, origin: str = ""
) -> tuple[int, float, float, int]:
    tensors, meta = _read_checkpoint(path)
    saved = meta["train"]
    changed = [k for k in _RESUME_FIELDS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise ValueError(
            f"{path} was written with other training settings ({', '.join(changed)}); "
            "delete it or pass --no-resume to start over"
        )
    if meta["init_from"] != origin:
        started = meta["init_from"] or "random weights"
        raise ValueError(
            f"{path} belongs to a run started from {started}, not from {origin or 'random weights'}; "
            "delete it or pass --no-resume to start over"
        )
    try:
        _restore(tensors, model, ema, opt, gen)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # tensors of another model
        raise _unusable(path, (str(e).splitlines() or [type(e).__name__])[0]) from None
    return meta["step"], meta["elapsed"], meta["cpu"], meta["cpu_from"]


def _restore(tensors: dict[str, torch.Tensor], model, ema, opt, gen) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = dict(model.named_parameters())
    # Rebuild Adam's state; "step" is a tensor in torch's AdamW.
    for key, val in tensors.items():
        if key.startswith("opt."):
            name, field = key[4:].rsplit(".", 1)
            opt.state[params[name]][field] = val
    gen.set_state(tensors["rng"])


def load_weights(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = json.loads((model_dir / "config.json").read_text())
    model = build(config.get("family", "dit"), config["model"])
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model.eval().requires_grad_(False), config


__all__ = ["TrainConfig", "load_weights", "train"]
