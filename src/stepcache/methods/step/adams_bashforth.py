"""AB-Cache (Adams-Bashforth caching; Yu et al., 2025, "AB-Cache: Training-Free Acceleration
of Diffusion Models via Adams-Bashforth Cached Feature Reuse"). Compute every ``interval``-th
step; a skipped step's output is a fixed linear combination of the last ``order`` computed ones,
with weights that follow the timesteps (so non-uniform schedules are handled).

Order k uses the last k real outputs: order 2 on a uniform grid is 2*o_k - o_{k-1}.
"""

from __future__ import annotations

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule
from .. import Method
from ..maths import History, on_schedule

SCHEMA = RuleSchema(
    method="adams-bashforth",
    level="step",
    summary="compute every `interval`-th step; extrapolate the others from the last 2-4 real outputs",
    params={
        "interval": Param("int", 2, "compute every interval-th step after warm-up", min=1, max=1000),
        "order": Param("int", 2, "number of past outputs combined (2-4)", min=2, max=4),
        "warmup": Param("int", 2, "steps computed in full at the start", min=0, max=100_000),
    },
)


class AdamsBashforth(StepRule):
    def __init__(self, interval: int, order: int, warmup: int):
        self.interval, self.order, self.warmup = interval, order, warmup

    def new_state(self) -> History:
        return History(self.order)

    def plan(self, ctx: CallContext, state: History) -> bool:
        return on_schedule(ctx.step, self.interval, self.warmup)

    def estimate(self, ctx: CallContext, state: History, rows: torch.Tensor | None) -> torch.Tensor:
        # Polynomial of degree order-1 through the last `order` outputs, in timestep.
        out = state.forecast(ctx.timestep_value(), self.order - 1)
        return out if rows is None else out.index_select(0, rows)

    def observe(
        self, ctx: CallContext, state: History, output: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        if rows is None:
            state.add(ctx.timestep_value(), output)


METHOD = Method(
    schema=SCHEMA,
    rule=AdamsBashforth,
    preset=(
        "AB-Cache: compute every 2nd step; extrapolate the others from the last two outputs (in timestep)."
    ),
    sweep=(
        {"warmup": 12},
        {"warmup": 6},
        {},
        {"warmup": 0},
        {"interval": 3},
        {"interval": 4},
    ),
)
