"""The pipeline a search, bench, compare or calibrate runs on, from what a user can type.

A *pipeline spec* is one of:

- a zoo key (``fmnist-dit``): the shipped model, with its own conditioning and defaults;
- a local diffusers folder (``./my-pipe``, holding ``model_index.json``): loaded with
  ``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``, never from the network;
- a factory ``module:function`` (``my_pipes:build``, importable from the current directory):
  called without arguments, it returns the pipeline.

Python callers pass the pipeline object itself. ``Target`` keeps what was loaded, its name for
reports, and whether it is a zoo model (whose workload has defaults) or the user's (whose
workload the user gives).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class PipelineSpecError(ValueError):
    """A pipeline spec that names nothing loadable; the message says which kind and why."""


@dataclass
class Target:
    pipe: Any
    name: str  # a zoo key, or what the user gave (folder, factory), for reports
    zoo: bool


def is_zoo(spec: Any) -> bool:
    from . import zoo

    if isinstance(spec, Target):
        return spec.zoo
    return isinstance(spec, str) and spec in zoo.names()


def check_spec(spec: str) -> str:
    """Refuse a spec that cannot name a pipeline, before anything loads (the CLI's usage error)."""
    from . import zoo

    if not isinstance(spec, str) or not spec:
        raise PipelineSpecError("model: give a zoo key, a diffusers folder or a module:function factory")
    if spec in zoo.names():
        if (problem := zoo.model_problem(spec)) is not None:
            raise PipelineSpecError(f"model: {problem}")
        return spec
    path = Path(spec)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PipelineSpecError(
                f"model: {spec} is a folder but not a diffusers pipeline (no model_index.json); "
                "save one with pipe.save_pretrained(folder)"
            )
        return spec
    module, sep, func = spec.partition(":")
    if sep and module and func.isidentifier() and all(p.isidentifier() for p in module.split(".")):
        return spec
    if path.exists():
        raise PipelineSpecError(f"model: {spec} is a file, not a diffusers pipeline folder")
    raise PipelineSpecError(
        f"model: {spec!r} is not a zoo key ({', '.join(zoo.names())}), an existing diffusers folder, "
        "or a module:function factory"
    )


def load_pipeline(spec: Any) -> Target:
    """What ``spec`` names, loaded; a pipeline object passes through as the user's own."""
    from . import zoo

    if isinstance(spec, Target):  # loaded already (compare loads once for its setup and the runs)
        return spec
    if not isinstance(spec, str):
        if spec is None or not callable(spec):
            raise PipelineSpecError(f"model: expected a pipeline or a spec string, got {type(spec).__name__}")
        return Target(spec, type(spec).__name__, zoo=False)
    check_spec(spec)
    if spec in zoo.names():
        return Target(zoo.load(spec), spec, zoo=True)
    if Path(spec).is_dir():
        return Target(_from_folder(spec), spec, zoo=False)
    return Target(_from_factory(spec), spec, zoo=False)


def _from_folder(folder: str) -> Any:
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    bars = [diffusers_logging]  # our progress bar is the one the user reads
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        bars.append(transformers_logging)
    for lib in bars:
        lib.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # diffusers raises many kinds for a broken folder
        first = (str(e).splitlines() or [""])[0][:300]
        raise PipelineSpecError(
            f"model: cannot load the pipeline in {folder} ({type(e).__name__}: {first})"
        ) from None
    finally:
        for lib in bars:
            lib.enable_progress_bar()
    _quiet(pipe)
    return pipe


def _from_factory(spec: str) -> Any:
    module_name, _, func_name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # a factory file beside the user
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise PipelineSpecError(
            f"model: cannot import {module_name!r} for {spec} ({type(e).__name__}: {e})"
        ) from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise PipelineSpecError(f"model: {module_name} has no function {func_name!r}")
    try:
        pipe = factory()
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:300]
        raise PipelineSpecError(f"model: the factory {spec} raised {type(e).__name__}: {first}") from None
    if pipe is None or not callable(pipe):
        raise PipelineSpecError(f"model: the factory {spec} returned {type(pipe).__name__}, not a pipeline")
    _quiet(pipe)
    return pipe


def _quiet(pipe: Any) -> None:
    """No per-step progress bars of the pipeline's own under ours."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def images_of(out: Any) -> np.ndarray:
    """A pipeline's output as float32 images (B, H, W, C) in [0, 1]; a video's frames stacked
    vertically into one tall image per sample, so every metric reads it as one picture."""
    value = getattr(out, "images", None)
    if value is None:
        value = getattr(out, "frames", None)
    if value is None and isinstance(out, (tuple, list)) and out:
        value = out[0]
    if value is None:
        raise ValueError(f"the pipeline returned {type(out).__name__} without images or frames")
    if hasattr(value, "detach"):  # a tensor (output_type="pt"): (B, C, H, W) or (B, F, C, H, W)
        arr = value.detach().float().cpu().numpy()
        arr = np.moveaxis(arr, -3, -1)
    elif isinstance(value, list) and value and not isinstance(value[0], np.ndarray):
        arr = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in value])  # PIL images
    else:
        arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 5:  # (B, F, H, W, C) -> (B, F*H, W, C)
        b, f, h, w, c = arr.shape
        arr = arr.reshape(b, f * h, w, c)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(
            f"the pipeline's images have shape {arr.shape}; expected (batch, height, width, channels)"
        )
    return arr.astype(np.float32, copy=False)


def fingerprint(pipe: Any) -> str:
    """Identifies a user's denoiser without reading every weight: its class, config and a hash of
    the first and last parameter tensors (a 12B model hashes in milliseconds)."""
    from .adapters import find_denoiser

    model = find_denoiser(pipe)
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in params[:1] + params[-1:]:
        h.update(p.detach().float().cpu().numpy().tobytes()[: 1 << 20])
    return "sha256:" + h.hexdigest()[:16]
