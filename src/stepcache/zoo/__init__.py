"""Benchmark models we train and ship. ``load(key)`` works offline from the package's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from .data import DataMissingError
from .models import MODELS, ZooModel
from .pipeline import CaptionPipeline, ClassConditionalPipeline, TextConditionalPipeline

WEIGHTS = Path(__file__).parent / "weights"


def names() -> list[str]:
    return list(MODELS)


def spec(key: str) -> ZooModel:
    if key not in MODELS:
        raise KeyError(f"unknown zoo model {key!r}; available: {', '.join(MODELS)}")
    return MODELS[key]


def shipped(key: str) -> bool:
    """Whether ``key``'s weights come with the package (a model may be defined, not yet trained)."""
    return (model_dir(key) / "model.safetensors").exists()


def model_problem(key: object) -> str | None:
    """Why ``key`` cannot be loaded from the package (unknown, or not trained yet), or None."""
    if not isinstance(key, str) or key not in MODELS:
        ready = ", ".join(k for k in MODELS if shipped(k))
        return f"unknown zoo model {key!r}; available: {ready}"
    if not shipped(key):
        return f"zoo model {key!r} is not shipped yet; train it with `stepcache zoo train {key} --out DIR`"
    return None


def model_dir(key: str) -> Path:
    spec(key)
    return WEIGHTS / key


def info(key: str) -> dict[str, Any]:
    s = spec(key)
    d = model_dir(key)
    card = d / "card.md"
    return {
        "key": key,
        "summary": s.summary,
        "family": s.family,
        "default_steps": s.default_steps,
        "default_guidance": s.default_guidance,
        "shipped": (d / "model.safetensors").exists(),
        "card": card.read_text() if card.exists() else None,
    }


def load(
    key: str, weights_dir: str | Path | None = None
) -> ClassConditionalPipeline | TextConditionalPipeline | CaptionPipeline:
    """The shipped pipeline for ``key`` (no network). ``weights_dir`` loads a freshly trained copy."""
    from .train import load_weights

    s = spec(key)
    d = Path(weights_dir) if weights_dir is not None else model_dir(key)
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{d / 'model.safetensors'} is missing; train it with `stepcache zoo train {key} --out {d}`"
        )
    model, config = load_weights(d)
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    if config.get("conditioning") == "tokens":
        pipe = CaptionPipeline(transformer=model, scheduler=scheduler)
        pipe.sample_shape = tuple(s.sample_shape or (3, 32, 32))
    elif config.get("conditioning") == "text":
        pipe = TextConditionalPipeline(transformer=model, scheduler=scheduler)
    elif config.get("family", "dit") == "unet":
        pipe = ClassConditionalPipeline(scheduler=scheduler, unet=model)
    else:
        pipe = ClassConditionalPipeline(scheduler=scheduler, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_steps = config["default_steps"]
    pipe.default_guidance = config["default_guidance"]
    return pipe


__all__ = [
    "CaptionPipeline",
    "ClassConditionalPipeline",
    "DataMissingError",
    "MODELS",
    "info",
    "load",
    "model_dir",
    "model_problem",
    "names",
    "shipped",
    "spec",
]
