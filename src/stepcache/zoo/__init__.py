"""Benchmark models we train and ship. ``load(key)`` works offline from the package's own files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from .pipeline import ClassConditionalPipeline

WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ZooEntry:
    key: str
    summary: str
    conditioning: str


ENTRIES: dict[str, ZooEntry] = {
    "digits-dit": ZooEntry(
        "digits-dit",
        "class-conditional DiT on scikit-learn's 8x8 digits; flow matching; the unit-test model",
        "class labels 0-9 + CFG (null label 10)",
    ),
}


def names() -> list[str]:
    return list(ENTRIES)


def _entry(key: str) -> ZooEntry:
    if key not in ENTRIES:
        raise KeyError(f"unknown zoo model {key!r}; available: {', '.join(ENTRIES)}")
    return ENTRIES[key]


def model_dir(key: str) -> Path:
    _entry(key)
    return WEIGHTS / key


def info(key: str) -> dict[str, Any]:
    entry = _entry(key)
    d = model_dir(key)
    out: dict[str, Any] = {"key": key, "summary": entry.summary, "conditioning": entry.conditioning}
    if (d / "config.json").exists():
        cfg = json.loads((d / "config.json").read_text())
        out.update(default_steps=cfg["default_steps"], default_guidance=cfg["default_guidance"])
    card = d / "card.md"
    out["card"] = card.read_text() if card.exists() else None
    return out


def load(key: str, weights_dir: str | Path | None = None) -> ClassConditionalPipeline:
    """The shipped pipeline for ``key`` (no network). ``weights_dir`` loads a freshly trained copy."""
    _entry(key)
    from .digits import load_weights

    d = Path(weights_dir) if weights_dir is not None else model_dir(key)
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{d / 'model.safetensors'} is missing; train it with `stepcache zoo train {key} --out {d}`"
        )
    model, config = load_weights(d)
    scheduler = FlowMatchEulerDiscreteScheduler(**config["scheduler"])
    pipe = ClassConditionalPipeline(transformer=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_steps = config["default_steps"]
    pipe.default_guidance = config["default_guidance"]
    return pipe


__all__ = ["ClassConditionalPipeline", "ENTRIES", "info", "load", "model_dir", "names"]
