"""Named default policies, one per technique. ``get(name, **overrides)`` returns a Policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import methods  # noqa: F401  (registers the methods' schemas)
from .errors import PolicyError
from .policy import SCHEMA, Policy, rule_schema


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    description: str
    params: dict[str, Any]


_PRESETS: dict[str, Preset] = {}


def _add(name: str, method: str, description: str, **params: Any) -> None:
    _PRESETS[name] = Preset(name, method, description, params)


_add(
    "static-interval",
    "static-interval",
    "Baseline: compute the first step, then every 2nd; reuse the last output in between.",
    interval=2,
    warmup=1,
)
_add(
    "fbcache",
    "fbcache",
    "First-Block Cache: run block 1; reuse the rest's residual while block 1's residual barely changes.",
    threshold=0.08,
    max_consecutive=3,
    warmup=1,
)
_add(
    "dbcache",
    "dbcache",
    "DBCache: run the first and the last block; reuse the middle's residual while block 1's holds.",
    fn=1,
    bn=1,
    threshold=0.08,
    max_consecutive=3,
    warmup=1,
)
_add(
    "delta-dit",
    "delta-dit",
    "Delta-DiT: reuse the back 2 blocks' deviation in the first half, the front 2's after; every 2nd step.",
    blocks=2,
    interval=2,
    boundary=0.5,
    warmup=1,
)
_add(
    "fora",
    "fora",
    "FORA: every block's attention and MLP outputs recomputed every 3rd step, reused in between.",
    interval=3,
    warmup=1,
)
_add(
    "deepcache",
    "deepcache",
    "DeepCache (U-Nets): full network every 3rd step; between, only the shallowest branch runs.",
    interval=3,
    branch=0,
    warmup=1,
)
_add(
    "teacache",
    "teacache",
    "TeaCache: skip all blocks until the first block's modulated input has changed by 0.15 in sum.",
    threshold=0.15,
    warmup=1,
)
_add(
    "magcache",
    "magcache",
    "MagCache: skip while the accumulated output-magnitude-ratio error stays under 0.06; reuse scaled.",
    threshold=0.06,
    max_consecutive=2,
    warmup=3,
)
_add(
    "taylorseer",
    "taylorseer",
    "TaylorSeer (output level): compute every 3rd step, forecast the rest with a 2nd-order expansion.",
    interval=3,
    order=2,
    warmup=3,
    variable="step",
)
_add(
    "taylorseer-feature",
    "taylorseer-feature",
    "TaylorSeer (feature level): the block stack every 3rd step; its residual forecast, order 2, between.",
    interval=3,
    order=2,
    warmup=3,
)
_add(
    "schedule",
    "schedule",
    "Planned schedule (what `stepcache search` writes): a per-step compute mask, the rest extrapolated.",
    mask=[True, True, True, True] + [True, False] * 8,
    order=1,
    variable="timestep",
)
_add(
    "adams-bashforth",
    "adams-bashforth",
    "AB-Cache: compute every 2nd step; extrapolate the others from the last two outputs (in timestep).",
    interval=2,
    order=2,
    warmup=2,
)
_add(
    "fsampler",
    "fsampler",
    "FSampler: extrapolate every 2nd prediction from the last 3 real ones, damped and validated.",
    interval=2,
    history=3,
    warmup=3,
    damping=0.9,
    max_norm_ratio=1.5,
)
_add(
    "adaptive-guidance",
    "adaptive-guidance",
    "Adaptive Guidance: stop a sample's unconditional pass once cos(c, u) > 0.99 and |c-u|/|c| < 0.02.",
    threshold=0.99,
    warmup=2,
    max_gap=0.02,
)
_add(
    "guidance-interval",
    "guidance-interval",
    "Guidance interval: classifier-free guidance only in the first 70% of the steps.",
    start=0.0,
    end=0.7,
)
_add(
    "linear-ag",
    "linear-ag",
    "LinearAG: every 2nd step in the first half, the unconditional pass is a fitted affine estimate.",
    interval=2,
    warmup=2,
    end=0.5,
)
_add(
    "cfg-cache",
    "cfg-cache",
    "FasterCache's CFG cache: unconditional pass every 2nd step; reuse the cached c - u between.",
    interval=2,
    warmup=2,
)


def names() -> list[str]:
    return list(_PRESETS)


def describe(name: str) -> str:
    return _lookup(name).description


def _lookup(name: str) -> Preset:
    if not isinstance(name, str) or name not in _PRESETS:
        raise PolicyError(f"preset: unknown name {name!r}; known presets: {', '.join(_PRESETS)}")
    return _PRESETS[name]


def get(name: str, **overrides: Any) -> Policy:
    """The preset's policy, with any parameter overridden (validated like a policy file)."""
    preset = _lookup(name)
    level = rule_schema(preset.method).level
    unknown = sorted(set(overrides) - set(rule_schema(preset.method).params))
    if unknown:
        known = ", ".join(sorted(rule_schema(preset.method).params))
        raise PolicyError(f"{name}.{unknown[0]}: unknown parameter for preset {name!r}; known: {known}")
    rule = {"method": preset.method, **preset.params, **overrides}
    try:
        return Policy.from_dict({"schema": SCHEMA, "name": name, "rules": {level: rule}})
    except PolicyError as e:
        # Name the preset parameter rather than the internal rule path.
        raise PolicyError(str(e).replace(f"rules.{level}.", f"{name}.", 1)) from None
