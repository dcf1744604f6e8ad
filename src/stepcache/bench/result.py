"""The bench result document (``result.json``): its schema check, and the sample images beside it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "stepcache.bench/1"
KINDS = ("reference", "stepcache", "peer")
TOP_FIELDS = {"schema": str, "model": str, "device": str, "torch": str, "diffusers": str, "command": str}
# field -> (types, may be None)
RUN_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), False),
    "kind": ((str,), False),
    "speedup": ((float, int), False),
    "nfe_fraction": ((float, int), False),
    "flop_fraction": ((float, int), False),
    "efficiency": ((float, int), False),
    "psnr": ((float, int), False),
    "psnr_ci": ((list,), False),
    "ssim": ((float, int), False),
    "fd_domain": ((float, int), True),
    "class_acc": ((float, int), True),
    "latency_s": ((dict,), False),
    "actions": ((str,), False),
}


class ResultError(ValueError):
    """A result document that does not follow ``stepcache.bench/1``; the message names the field."""


def validate_result(doc: Any) -> None:
    """Raise ResultError naming the first field that is missing or of the wrong type."""
    if not isinstance(doc, Mapping):
        raise ResultError(f"result: expected an object, got {type(doc).__name__}")
    for key, typ in TOP_FIELDS.items():
        if not isinstance(doc.get(key), typ):
            raise ResultError(f"{key}: expected {typ.__name__}, got {doc.get(key)!r}")
    if doc["schema"] != SCHEMA:
        raise ResultError(f"schema: expected {SCHEMA!r}, got {doc['schema']!r}")
    if not (doc.get("commit") is None or isinstance(doc["commit"], str)):
        raise ResultError(f"commit: expected a string or null, got {doc['commit']!r}")
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ResultError("runs: expected a non-empty list")
    names = set()
    for i, run in enumerate(runs):
        where = f"runs[{i}]"
        if not isinstance(run, Mapping):
            raise ResultError(f"{where}: expected an object")
        for key, (types, nullable) in RUN_FIELDS.items():
            value = run.get(key)
            if value is None and nullable and key in run:
                continue
            if isinstance(value, bool) or not isinstance(value, types):
                raise ResultError(
                    f"{where}.{key}: expected {'/'.join(t.__name__ for t in types)}, got {value!r}"
                )
        if run["kind"] not in KINDS:
            raise ResultError(f"{where}.kind: expected one of {KINDS}, got {run['kind']!r}")
        if run["name"] in names:
            raise ResultError(f"{where}.name: {run['name']!r} appears twice")
        names.add(run["name"])
        if not (run["speedup"] > 0 and 0 <= run["flop_fraction"] and 0 <= run["nfe_fraction"] <= 1):
            raise ResultError(f"{where}: speedup must be > 0 and fractions within [0, 1]")
        if len(run["psnr_ci"]) != 2:
            raise ResultError(f"{where}.psnr_ci: expected [low, high]")
        latency = run["latency_s"]
        if not all(isinstance(latency.get(k), (float, int)) for k in ("median", "min", "max")):
            raise ResultError(f"{where}.latency_s: expected median, min and max in seconds")
        if math.isnan(run["psnr"]):
            raise ResultError(f"{where}.psnr: is NaN")
    if runs[0]["kind"] != "reference":
        raise ResultError("runs[0].kind: the first run must be the reference")
    for i, item in enumerate(doc.get("unavailable", [])):
        if not (isinstance(item, Mapping) and isinstance(item.get("name"), str) and item.get("reason")):
            raise ResultError(f"unavailable[{i}]: expected an object with name and reason")


def save_samples(path: str | os.PathLike, samples: Mapping[str, np.ndarray]) -> Path:
    """Each run's first images as uint8 tensors in one safetensors file (written atomically)."""
    import torch
    from safetensors.torch import save

    from .._io import atomic_write_bytes

    tensors = {
        name: torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8)).contiguous()
        for name, images in samples.items()
    }
    return atomic_write_bytes(path, save(tensors))


def load_samples(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) / 255 for k, v in load_file(str(path)).items()}
