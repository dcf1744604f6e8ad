"""DeepCache (Ma et al., 2024, "DeepCache: Accelerating Diffusion Models for Free"). Adjacent
steps share the U-Net's deep, high-level features: compute the whole U-Net every
``interval``-th step and, in between, run only the shallow branch (the first ``branch`` + 1 down
blocks and the matching up blocks), feeding it the cached deep feature.

Uniform schedule, or the paper's non-uniform one (``schedule="quadratic"``) that puts the
full computations closer together around step ``center`` of 0..1. U-Nets only.
"""

from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...policy import Param, RuleSchema
from ...runtime import BranchRule, CallContext
from .. import Method
from ..maths import on_schedule

SCHEMA = RuleSchema(
    method="deepcache",
    level="block",
    summary="U-Nets: whole network every `interval`-th step; else the shallow branch on cached deep features",
    params={
        "interval": Param(
            "int", 3, "compute the whole U-Net every interval-th step (paper: 3-5)", min=1, max=1000
        ),
        "branch": Param("int", 0, "skip branch: down blocks 0..branch and their up blocks stay live", min=0),
        "warmup": Param("int", 1, "steps computed in full at the start", min=0, max=100_000),
        "schedule": Param(
            "str",
            "uniform",
            "full steps evenly spaced, or denser around `center`",
            choices=("uniform", "quadratic"),
        ),
        "center": Param(
            "float", 0.5, "quadratic schedule: where the full steps are densest (0..1)", min=0, max=1
        ),
    },
)


def quadratic_steps(num_steps: int, interval: int, center: float) -> set[int]:
    """Full-compute steps, about num_steps / interval of them, spaced by a quadratic around
    ``center`` (the DeepCache paper's non-uniform 1:N strategy)."""
    count = max(1, round(num_steps / interval))
    c = center * (num_steps - 1)
    # Offsets from the centre grow quadratically; map k in [-1, 1] to a step.
    out = {0}
    for i in range(count):
        k = -1 + 2 * i / max(1, count - 1)
        span = max(c, num_steps - 1 - c)
        out.add(min(num_steps - 1, max(0, round(c + span * k * abs(k)))))
    return out


class DeepCache(BranchRule):
    def __init__(self, interval: int, branch: int, warmup: int, schedule: str, center: float):
        self.interval, self.branch, self.warmup = interval, branch, warmup
        self.schedule, self.center = schedule, center

    def modules(self, adapter: Any, model: Any) -> tuple[list[Any], list[Any]]:
        split = getattr(adapter, "branch_split", None)
        if split is None:
            raise UnsupportedModelError(
                f"deepcache caches U-Net branches, and {type(model).__name__} ({adapter.family}) "
                "is not a U-Net"
            )
        skipped, deep = split(self.branch)
        if deep is None:
            return [], []  # nothing deeper than this branch: everything runs
        return [deep], [m for m in skipped if m is not deep]

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        if ctx.step < self.warmup:
            return True
        if self.schedule == "quadratic" and ctx.num_steps:
            if "full" not in state:
                state["full"] = quadratic_steps(ctx.num_steps, self.interval, self.center)
            return ctx.step in state["full"]
        return on_schedule(ctx.step, self.interval, self.warmup)


METHOD = Method(
    schema=SCHEMA,
    rule=DeepCache,
    preset="DeepCache (U-Nets): full network every 3rd step; between, only the shallowest branch runs.",
    sweep=(
        {},
        {"interval": 5},
    ),
)
