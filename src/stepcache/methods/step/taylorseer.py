"""TaylorSeer, output level (Liu et al., 2025, "From Reusing to Forecasting: Accelerating
Diffusion Models with TaylorSeers"). Compute every ``interval``-th step; forecast the skipped
steps' outputs from an order-``order`` expansion over the last computed ones instead of reusing.

We use the polynomial through the last order+1 computed outputs (the finite-difference Taylor
expansion in an exact basis), in step index or in timestep (``variable``).
"""

from __future__ import annotations

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule
from .. import Method
from ..maths import History, on_schedule

SCHEMA = RuleSchema(
    method="taylorseer",
    level="step",
    summary="compute every `interval`-th step; forecast the others with an order-1..3 expansion",
    params={
        "interval": Param(
            "int", 3, "compute every interval-th step after warm-up (paper: 3-6)", min=1, max=1000
        ),
        "order": Param("int", 2, "expansion order (paper default 2)", min=1, max=3),
        "expansion": Param(
            "str",
            "polynomial",
            "the polynomial through the points, or TaylorSeer's own expansion (diffusers' form)",
            choices=("polynomial", "taylor"),
        ),
        "warmup": Param("int", 3, "steps computed in full at the start", min=0, max=100_000),
        "variable": Param(
            "str", "step", "differences in step index or in timestep", choices=("step", "timestep")
        ),
    },
)


class TaylorSeer(StepRule):
    damping = 1.0  # the forecast in full (the planned schedule may shorten it)

    def __init__(self, interval: int, order: int, warmup: int, variable: str, expansion: str = "polynomial"):
        self.interval, self.order, self.warmup, self.variable = interval, order, warmup, variable
        self.expansion = expansion

    def new_state(self) -> History:
        return History(self.order + 1)

    def _x(self, ctx: CallContext) -> float:
        return float(ctx.step) if self.variable == "step" else ctx.timestep_value()

    def plan(self, ctx: CallContext, state: History) -> bool:
        return on_schedule(ctx.step, self.interval, self.warmup)

    def estimate(self, ctx: CallContext, state: History, rows: torch.Tensor | None) -> torch.Tensor:
        out = state.forecast(self._x(ctx), self.order, self.expansion, self.damping)
        return out if rows is None else out.index_select(0, rows)

    def observe(
        self, ctx: CallContext, state: History, output: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        if rows is None:  # fixed schedules decide for the whole batch
            state.add(self._x(ctx), output)


METHOD = Method(
    schema=SCHEMA,
    rule=TaylorSeer,
    preset="TaylorSeer (output level): compute every 3rd step, forecast the rest with a 2nd-order expansion.",
    sweep=(
        {},
        {"interval": 4, "warmup": 2},
    ),
)
