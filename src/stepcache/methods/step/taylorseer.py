"""TaylorSeer, output level (Liu et al., 2025, "From Reusing to Forecasting: Accelerating
Diffusion Models with TaylorSeers"). Compute every ``interval``-th step; forecast the skipped
steps' outputs from an order-``order`` expansion over the last computed ones instead of reusing.

We use the polynomial through the last order+1 computed outputs (the finite-difference Taylor
expansion in an exact basis), in step index or in timestep (``variable``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule
from .. import register_method
from .extrapolation import History
from .static_interval import on_schedule

SCHEMA = RuleSchema(
    method="taylorseer",
    level="step",
    summary="compute every `interval`-th step; forecast the others with an order-1..3 expansion",
    params={
        "interval": Param(
            "int", 3, "compute every interval-th step after warm-up (paper: 3-6)", min=1, max=1000
        ),
        "order": Param("int", 2, "expansion order (paper default 2)", min=1, max=3),
        "warmup": Param("int", 3, "steps computed in full at the start", min=0, max=100_000),
        "variable": Param(
            "str", "step", "differences in step index or in timestep", choices=("step", "timestep")
        ),
    },
)


class TaylorSeer(StepRule):
    def __init__(self, interval: int, order: int, warmup: int, variable: str):
        self.interval, self.order, self.warmup, self.variable = interval, order, warmup, variable

    def _x(self, ctx: CallContext) -> float:
        return float(ctx.step) if self.variable == "step" else ctx.timestep_value()

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        return on_schedule(ctx.step, self.interval, self.warmup)

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> torch.Tensor:
        out = History(state, self.order + 1).forecast(self._x(ctx), self.order)
        return out if rows is None else out.index_select(0, rows)

    def observe(
        self, ctx: CallContext, state: dict[str, Any], output: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        if rows is None:  # fixed schedules decide for the whole batch
            History(state, self.order + 1).add(self._x(ctx), output)


def _factory(p: Mapping[str, Any]) -> TaylorSeer:
    return TaylorSeer(p["interval"], p["order"], p["warmup"], p["variable"])


register_method(SCHEMA, _factory)
