"""What a user generates, as data: the per-sample call arguments, steps, guidance, resolution,
and the seeds a search calibrates on and the disjoint seeds it is judged on.

A workload is a small JSON or YAML file (or the same ``Workload`` object in Python)::

    {"inputs": {"prompt": ["a red fox", "a city at night"], "negative_prompt": ["blurry"]},
     "steps": 20, "guidance": 5.0, "height": 512, "width": 512,
     "calib_seeds": 16, "heldout_seeds": [1000, 1001, 1002, 1003],
     "call": {"max_sequence_length": 128}}

``inputs`` lists, per pipeline argument, the values sample ``i`` takes (cycled: sample ``i`` gets
value ``i % len``), so a batch of 16 seeds with 4 prompts sees each prompt 4 times. ``call`` holds
arguments every call gets as they are. Seeds are a count (calibration ``0..N-1``, held-out
``10000..10000+M-1``) or explicit lists; the two sets must not overlap. Every field is checked
when the workload is made, and an error names the field.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._limits import MAX_CALIB_SEEDS, MAX_EVAL_SEEDS, MAX_GUIDANCE, MAX_SEED, MAX_STEPS

HELDOUT_SEED_BASE = 10_000  # held-out seeds given as a count are 10_000 + i
MAX_WORKLOAD_BYTES = 4 * 1024 * 1024
FIELDS = ("inputs", "steps", "guidance", "height", "width", "calib_seeds", "heldout_seeds", "call")
# Arguments the harness sets itself from the workload's own fields.
RESERVED = ("num_inference_steps", "guidance_scale", "generator", "height", "width", "output_type")


class WorkloadError(ValueError):
    """A workload that cannot be used; the message names the field."""


def _json_value(name: str, value: Any, depth: int = 0) -> None:
    """Refuse what JSON cannot carry (a workload is data, saved and compared as JSON)."""
    if depth > 8:
        raise WorkloadError(f"{name}: nested too deeply")
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise WorkloadError(f"{name}: must be a finite number, got {value}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _json_value(f"{name}[{i}]", v, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise WorkloadError(f"{name}: keys must be strings, got {k!r}")
            _json_value(f"{name}.{k}", v, depth + 1)
        return
    raise WorkloadError(f"{name}: must be JSON data (text, numbers, lists), got {type(value).__name__}")


def _seeds(name: str, value: Any, base: int, limit: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= limit:
            raise WorkloadError(f"{name}: a count must lie in [1, {limit}], got {value}")
        return tuple(base + i for i in range(value))
    if not isinstance(value, (list, tuple)) or not value:
        raise WorkloadError(f"{name}: give a count or a non-empty list of seeds, got {value!r}")
    if len(value) > limit:
        raise WorkloadError(f"{name}: at most {limit} seeds, got {len(value)}")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise WorkloadError(f"{name}: seeds are integers in [0, 2**63 - 1], got {s!r}")
    if len(set(value)) != len(value):
        raise WorkloadError(f"{name}: a seed appears twice")
    return tuple(value)


def _positive_int(name: str, value: Any, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise WorkloadError(f"{name}: must be an integer in [1, {hi}], got {value!r}")
    return value


@dataclass(frozen=True)
class Workload:
    inputs: dict[str, list[Any]] = field(default_factory=dict)
    steps: int | None = None  # None: the pipeline's default
    guidance: float | None = None  # guidance_scale; None: the pipeline's default
    height: int | None = None
    width: int | None = None
    calib_seeds: Any = 16
    heldout_seeds: Any = 16
    call: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, dict):
            raise WorkloadError(f"inputs: must map argument names to lists, got {type(self.inputs).__name__}")
        inputs = {}
        for key, values in self.inputs.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise WorkloadError(f"inputs: {key!r} is not an argument name")
            if key in RESERVED:
                raise WorkloadError(f"inputs.{key}: set by the workload's own fields; remove it")
            if not isinstance(values, (list, tuple)) or not values:
                raise WorkloadError(f"inputs.{key}: must be a non-empty list (one value per sample, cycled)")
            _json_value(f"inputs.{key}", list(values))
            inputs[key] = list(values)
        object.__setattr__(self, "inputs", inputs)
        if not isinstance(self.call, dict):
            raise WorkloadError(f"call: must map argument names to values, got {type(self.call).__name__}")
        for key in self.call:
            if not isinstance(key, str) or not key.isidentifier():
                raise WorkloadError(f"call: {key!r} is not an argument name")
            if key in RESERVED:
                raise WorkloadError(f"call.{key}: set by the workload's own fields; remove it")
            if key in inputs:
                raise WorkloadError(f"call.{key}: also given per sample in inputs; keep one")
        _json_value("call", self.call)
        object.__setattr__(self, "call", dict(self.call))
        if self.steps is not None:
            _positive_int("steps", self.steps, MAX_STEPS)
            if self.steps < 2:
                raise WorkloadError("steps: at least 2 (one step leaves nothing to skip)")
        _positive_int("height", self.height, 16384)
        _positive_int("width", self.width, 16384)
        if self.guidance is not None:
            g = self.guidance
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= MAX_GUIDANCE:
                raise WorkloadError(f"guidance: must be a number in [0, {MAX_GUIDANCE:g}], got {g!r}")
            if not math.isfinite(g):
                raise WorkloadError(f"guidance: must be finite, got {g}")
            object.__setattr__(self, "guidance", float(g))
        calib = _seeds("calib_seeds", self.calib_seeds, 0, MAX_CALIB_SEEDS)
        held = _seeds("heldout_seeds", self.heldout_seeds, HELDOUT_SEED_BASE, MAX_EVAL_SEEDS)
        shared = sorted(set(calib) & set(held))
        if shared:
            raise WorkloadError(
                f"heldout_seeds: {len(shared)} seed(s) also in calib_seeds (e.g. {shared[0]}); "
                "held-out seeds must be unseen by the search"
            )
        object.__setattr__(self, "calib_seeds", calib)
        object.__setattr__(self, "heldout_seeds", held)

    # ------------------------------------------------------------------ as data
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"inputs": self.inputs}
        for name in ("steps", "guidance", "height", "width"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["calib_seeds"] = list(self.calib_seeds)
        out["heldout_seeds"] = list(self.heldout_seeds)
        if self.call:
            out["call"] = self.call
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Workload:
        if not isinstance(data, dict):
            raise WorkloadError(f"workload: must be a mapping of fields, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise WorkloadError(f"{unknown[0]}: unknown workload field; fields are {', '.join(FIELDS)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Workload:
        """A workload from a .json, .yaml or .yml file."""
        from ._io import read_limited

        p = Path(path)
        raw = read_limited(p, MAX_WORKLOAD_BYTES, "workload")
        parse_errors: tuple[type[BaseException], ...] = (UnicodeDecodeError, ValueError, RecursionError)
        try:
            text = raw.decode("utf-8")
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                parse_errors = (*parse_errors, yaml.YAMLError)
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except parse_errors as e:
            raise WorkloadError(f"workload: {p.name} is not valid {_kind(p)} ({e})") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        from ._io import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    # ------------------------------------------------------------------ against a pipeline
    def check_pipeline(self, pipe: Any) -> None:
        """Refuse arguments the pipeline's ``__call__`` does not take, naming them."""
        params = _call_parameters(pipe)
        if params is None:  # takes **kwargs: nothing to check against
            return
        wanted = [*self.inputs, *self.call]
        if self.guidance is not None:
            wanted.append("guidance_scale")
        if self.height is not None:
            wanted.append("height")
        if self.width is not None:
            wanted.append("width")
        missing = [name for name in wanted if name not in params]
        if missing:
            field_of = {"guidance_scale": "guidance", "height": "height", "width": "width"}
            where = field_of.get(missing[0], "inputs" if missing[0] in self.inputs else "call")
            raise WorkloadError(
                f"{where}: {type(pipe).__name__} does not take {', '.join(map(repr, missing))}; "
                f"it takes {', '.join(sorted(p for p in params if p != 'self'))}"
            )

    def cond(self, n: int) -> dict[str, list[Any]]:
        """Per-sample arguments for ``n`` samples (each list cycled)."""
        return {k: [v[i % len(v)] for i in range(n)] for k, v in self.inputs.items()}

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Fixed arguments of every call: ``call``, the resolution, and numpy output if offered."""
        kw: dict[str, Any] = dict(self.call)
        if self.height is not None:
            kw["height"] = self.height
        if self.width is not None:
            kw["width"] = self.width
        params = _call_parameters(pipe)
        if params is None or "output_type" in params:
            kw.setdefault("output_type", "np")
        return kw


def _kind(p: Path) -> str:
    return "YAML" if p.suffix.lower() in (".yaml", ".yml") else "JSON"


def _call_parameters(pipe: Any) -> set[str] | None:
    """The keyword names ``pipe(...)`` takes; None when it takes any (``**kwargs``). A diffusers
    pipeline's ``**kwargs`` only catches deprecated callback arguments and drops anything else
    silently, so its named parameters are the ones it takes."""
    try:
        sig = inspect.signature(pipe.__call__ if not inspect.isfunction(pipe) else pipe)
    except (TypeError, ValueError):
        return None
    named = {n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if len(named) < len(sig.parameters) and not hasattr(pipe, "components"):
        return None
    return named


def takes(pipe: Any, name: str) -> bool:
    """Whether ``pipe(...)`` declares the keyword ``name``."""
    params = _call_parameters(pipe)
    return params is not None and name in params


def declared_default(pipe: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    """The default ``pipe(...)`` declares for keyword ``name`` when it is of ``kind`` (not a
    bool), else None: what the pipeline uses when the workload leaves ``name`` out."""
    try:
        param = inspect.signature(pipe.__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if param is None or not isinstance(param.default, kind) or isinstance(param.default, bool):
        return None
    return param.default


def as_workload(value: Any) -> Workload:
    """A ``Workload`` from itself, a mapping, or a file path."""
    if isinstance(value, Workload):
        return value
    if isinstance(value, dict):
        return Workload.from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        return Workload.load(value)
    raise WorkloadError(f"workload: expected a Workload, a mapping or a file, got {type(value).__name__}")
