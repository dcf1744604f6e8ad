"""FSampler (Vladimir et al., 2025, "FSampler: Training-Free Acceleration of Diffusion Sampling
via Epsilon Extrapolation"). Replace some model calls by extrapolating the prediction from the
last 2-4 real ones (h2/h3/h4 finite-difference predictors), damp the step from the last real
prediction, validate (finite, norm within a band of the last real one) and otherwise compute.
"""

from __future__ import annotations

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule
from .. import Method
from ..maths import History, on_schedule

SCHEMA = RuleSchema(
    method="fsampler",
    level="step",
    summary="extrapolate the prediction from the last 2-4 real ones; validate and damp, else compute",
    params={
        "interval": Param(
            "int", 2, "compute every interval-th step after warm-up; extrapolate between", min=1, max=100
        ),
        "history": Param("int", 3, "real predictions used: 2 (h2, linear), 3 (h3), 4 (h4)", min=2, max=4),
        "warmup": Param("int", 3, "steps computed in full at the start", min=0, max=100_000),
        "damping": Param(
            "float", 0.9, "fraction of the extrapolated change applied (1 = none)", min=0.0, max=1.0
        ),
        "max_norm_ratio": Param(
            "float",
            1.5,
            "reject a forecast whose norm leaves [1/r, r] x the last real one",
            min=1.0,
            max=100.0,
        ),
    },
)


class FSampler(StepRule):
    def __init__(self, interval: int, history: int, warmup: int, damping: float, max_norm_ratio: float):
        self.interval, self.history, self.warmup = interval, history, warmup
        self.damping, self.max_norm_ratio = damping, max_norm_ratio

    def new_state(self) -> History:
        return History(self.history)

    def plan(self, ctx: CallContext, state: History) -> bool:
        return on_schedule(ctx.step, self.interval, self.warmup)

    def estimate(self, ctx: CallContext, state: History, rows: torch.Tensor | None) -> torch.Tensor | None:
        last = state.outputs[-1]
        pred = state.forecast(float(ctx.step), self.history - 1, damping=self.damping)
        # Validation: per-sample norm ratio to the last real prediction stays in the band.
        ratio = pred.float().flatten(1).norm(dim=1) / last.float().flatten(1).norm(dim=1).clamp_min(1e-12)
        ok = (
            torch.isfinite(pred).all()
            & (ratio <= self.max_norm_ratio).all()
            & (ratio >= 1 / self.max_norm_ratio).all()
        )
        if not bool(ok):
            return None
        return pred if rows is None else pred.index_select(0, rows)

    def observe(
        self, ctx: CallContext, state: History, output: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        if rows is None:
            state.add(float(ctx.step), output)


METHOD = Method(
    schema=SCHEMA,
    rule=FSampler,
    preset="FSampler: extrapolate every 2nd prediction from the last 3 real ones, damped and validated.",
)
