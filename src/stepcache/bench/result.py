"""The bench result document (``result.json``): its schema check, and the sample images beside it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._limits import MAX_STEPS

SCHEMA = "stepcache.bench/1"
KINDS = ("reference", "stepcache", "peer")
TOP_FIELDS = {"schema": str, "model": str, "device": str, "torch": str, "diffusers": str, "command": str}
MAX_RESULT_BYTES = 64 * 1024 * 1024
MAX_SAMPLES_BYTES = 256 * 1024 * 1024
MAX_DEPTH = 32  # params hold a policy: a few levels; a deeper document is not one bench wrote
MAX_RUNS = 1000
MAX_LABEL = 500  # run names, model and device are drawn into the plots
MAX_ACTIONS = 4 * MAX_STEPS  # one letter per denoiser call: a step or a few
MAX_SAMPLE_PIXELS = 2**20  # images x height x width of one run's grid
# Numbers: field -> (may be None, may be NaN, may be +inf)
RUN_NUMBERS: dict[str, tuple[bool, bool, bool]] = {
    "speedup": (False, False, False),
    "nfe_fraction": (False, False, False),
    "flop_fraction": (False, False, False),
    "efficiency": (False, False, False),
    "psnr": (False, False, True),  # +inf: every image identical to the reference
    "ssim": (False, False, False),
    "fd_domain": (True, False, False),
    "class_acc": (True, False, False),
}
# Fractions in [0, 1] that older documents do not have: absent, null or a number.
RUN_FRACTIONS_OPTIONAL = ("adherence",)
# How a run's speedup stands against its FLOP ideal (absent in older documents).
SPEEDUP_STATUS = ("ok", "remeasured", "above_flop_ideal")


def _check_speed(run: Mapping[str, Any], where: str) -> None:
    """The optional speed fields: status, FLOP ideal, and the speedup's interval (or null)."""
    if "speedup_status" in run and run["speedup_status"] not in SPEEDUP_STATUS:
        raise ResultError(f"{where}.speedup_status: expected one of {', '.join(SPEEDUP_STATUS)}")
    if "flop_ideal" in run and not _number(f"{where}.flop_ideal", run["flop_ideal"], inf_ok=True) > 0:
        raise ResultError(f"{where}.flop_ideal: must be > 0")
    ci = run.get("speedup_ci")
    if ci is None:
        return
    if not isinstance(ci, list) or len(ci) != 2:
        raise ResultError(f"{where}.speedup_ci: expected [low, high] or null, got {_show(ci)}")
    low, high = (_number(f"{where}.speedup_ci[{j}]", b) for j, b in enumerate(ci))
    if not 0 < low <= high:
        raise ResultError(f"{where}.speedup_ci: expected 0 < low <= high, got {_show(ci)}")


class ResultError(ValueError):
    """A result document that does not follow ``stepcache.bench/1``; the message names the field."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_tree(node: Any, where: str, depth: int = 0) -> None:
    """Bound nesting and refuse strings that cannot be written back as UTF-8 (lone surrogates)."""
    if depth > MAX_DEPTH:
        raise ResultError(f"{where or 'result'}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            raise ResultError(f"{where}: not valid Unicode text") from None
    elif isinstance(node, Mapping):
        for key, value in node.items():
            _check_tree(key, where, depth + 1)
            _check_tree(value, f"{where}.{key}" if where else str(key), depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_tree(value, f"{where}[{i}]", depth + 1)


def _number(where: str, value: Any, nan_ok: bool = False, inf_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (float, int)):
        raise ResultError(f"{where}: expected a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ResultError(f"{where}: {value.bit_length()}-bit integer is out of range") from None
    if math.isnan(number) and not nan_ok:
        raise ResultError(f"{where}: is NaN")
    if math.isinf(number) and not (inf_ok and number > 0):
        raise ResultError(f"{where}: must be finite, got {number}")
    return number


def _text(where: str, value: Any, limit: int | None = None) -> str:
    if not isinstance(value, str):
        raise ResultError(f"{where}: expected a string, got {_show(value)}")
    if limit is not None and len(value) > limit:
        raise ResultError(f"{where}: longer than {limit} characters")
    return value


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**53:
        raise ResultError(f"{where}: expected a positive integer, got {_show(value)}")
    return value


def _validate_protocol(proto: Any) -> None:
    if not isinstance(proto, Mapping):
        raise ResultError(f"protocol: expected an object, got {_show(proto)}")
    for key in ("steps", "num_seeds", "repeats"):
        _positive_int(f"protocol.{key}", proto.get(key))
    # null: a pipeline without a guidance scale
    if proto.get("guidance") is not None and _number("protocol.guidance", proto.get("guidance")) < 0:
        raise ResultError("protocol.guidance: must be >= 0")


def _validate_run(run: Any, where: str) -> None:
    if not isinstance(run, Mapping):
        raise ResultError(f"{where}: expected an object, got {_show(run)}")
    _text(f"{where}.name", run.get("name"), MAX_LABEL)
    kind = _text(f"{where}.kind", run.get("kind"))
    if kind not in KINDS:
        raise ResultError(f"{where}.kind: expected one of {KINDS}, got {_show(kind)}")
    if run.get("peer") is not None:
        _text(f"{where}.peer", run["peer"], MAX_LABEL)
    actions = _text(f"{where}.actions", run.get("actions"), MAX_ACTIONS)
    if set(actions) - set("CPGE"):
        raise ResultError(f"{where}.actions: expected letters C, P, G and E only")
    for key, (nullable, nan_ok, inf_ok) in RUN_NUMBERS.items():
        if nullable and key in run and run[key] is None:
            continue
        _number(f"{where}.{key}", run.get(key), nan_ok, inf_ok)
    if not (run["speedup"] > 0 and 0 <= run["flop_fraction"] and 0 <= run["nfe_fraction"] <= 1):
        raise ResultError(f"{where}: speedup must be > 0 and fractions within [0, 1]")
    _check_speed(run, where)
    for key in RUN_FRACTIONS_OPTIONAL:
        if run.get(key) is not None:
            _number(f"{where}.{key}", run[key], False, False)
            if not 0 <= run[key] <= 1:
                raise ResultError(f"{where}.{key}: must lie in [0, 1], got {_show(run[key])}")
    ci = run.get("psnr_ci")
    if not isinstance(ci, list) or len(ci) != 2:
        raise ResultError(f"{where}.psnr_ci: expected [low, high], got {_show(ci)}")
    for j, bound in enumerate(ci):  # null: no interval (every image identical to its reference)
        if bound is not None:
            _number(f"{where}.psnr_ci[{j}]", bound, nan_ok=True, inf_ok=True)
    latency = run.get("latency_s")
    if not isinstance(latency, Mapping):
        raise ResultError(f"{where}.latency_s: expected median, min and max in seconds")
    for key in ("median", "min", "max"):
        if _number(f"{where}.latency_s.{key}", latency.get(key)) < 0:
            raise ResultError(f"{where}.latency_s.{key}: must be >= 0")


def validate_result(doc: Any) -> None:
    """Raise ResultError naming the first field that is missing or of the wrong type or range."""
    if not isinstance(doc, Mapping):
        raise ResultError(f"result: expected an object, got {type(doc).__name__}")
    _check_tree(doc, "")
    for key in TOP_FIELDS:
        _text(key, doc.get(key), MAX_LABEL if key in ("model", "device") else None)
    if doc["schema"] != SCHEMA:
        raise ResultError(f"schema: expected {SCHEMA!r}, got {_show(doc['schema'])}")
    if not (doc.get("commit") is None or isinstance(doc["commit"], str)):
        raise ResultError(f"commit: expected a string or null, got {_show(doc['commit'])}")
    _validate_protocol(doc.get("protocol"))
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ResultError("runs: expected a non-empty list")
    if len(runs) > MAX_RUNS:
        raise ResultError(f"runs: more than {MAX_RUNS}")
    names = set()
    for i, run in enumerate(runs):
        _validate_run(run, f"runs[{i}]")
        if run["name"] in names:
            raise ResultError(f"runs[{i}].name: {_show(run['name'])} appears twice")
        names.add(run["name"])
    if runs[0]["kind"] != "reference":
        raise ResultError("runs[0].kind: the first run must be the reference")
    unavailable = doc.get("unavailable", [])
    if not isinstance(unavailable, list):
        raise ResultError(f"unavailable: expected a list, got {_show(unavailable)}")
    for i, item in enumerate(unavailable):
        if not (isinstance(item, Mapping) and isinstance(item.get("name"), str) and item.get("reason")):
            raise ResultError(f"unavailable[{i}]: expected an object with name and reason")
        _text(f"unavailable[{i}].reason", item["reason"])


def encode_samples(samples: Mapping[str, np.ndarray]) -> bytes:
    """Each run's first images (floats in [0, 1]) as uint8 tensors in safetensors bytes."""
    from safetensors.numpy import save

    return save(
        {
            name: np.ascontiguousarray((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
            for name, images in samples.items()
        }
    )


def _check_sample(path: Path, name: str, array: np.ndarray, shape: tuple[int, ...] | None) -> None:
    where = f"{path}: tensor {_show(name)}"
    if array.dtype != np.uint8:
        raise ResultError(f"{where}: expected uint8 images, got {array.dtype}")
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or 0 in array.shape:
        raise ResultError(f"{where}: expected images (N, H, W, 1 or 3), got shape {tuple(array.shape)}")
    if math.prod(array.shape[:3]) > MAX_SAMPLE_PIXELS:
        raise ResultError(f"{where}: more than {MAX_SAMPLE_PIXELS} pixels")
    if shape is not None and array.shape != shape:
        raise ResultError(f"{where}: shape {tuple(array.shape)} differs from the others' {shape}")


def decode_samples(data: bytes, path: str | os.PathLike = "samples.safetensors") -> dict[str, np.ndarray]:
    """Sample images from safetensors bytes, as floats in [0, 1]; ResultError naming ``path`` and
    the tensor when they are not a bench's samples (one image shape, uint8)."""
    from safetensors.numpy import load

    path = Path(path)
    try:
        tensors = load(data)
    except Exception as e:  # the parser's errors on hostile bytes are not one documented type
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise ResultError(f"{path}: not a safetensors file ({detail})") from None
    shape = None
    for name, array in tensors.items():
        _check_sample(path, name, array, shape)
        shape = array.shape
    return {name: array.astype(np.float32) / 255 for name, array in tensors.items()}


def save_samples(path: str | os.PathLike, samples: Mapping[str, np.ndarray]) -> Path:
    """Each run's first images as uint8 tensors in one safetensors file (written atomically)."""
    from .._io import atomic_write_bytes

    return atomic_write_bytes(path, encode_samples(samples))


def load_samples(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The sample images of a bench folder; ValueError naming the file when they cannot be used."""
    from .._io import read_limited

    return decode_samples(read_limited(path, MAX_SAMPLES_BYTES, "samples file"), path)
