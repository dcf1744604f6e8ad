"""Static interval: the fixed-schedule baseline every other method must beat.

Compute the first ``warmup`` steps, then every ``interval``-th step; in between return the last
computed output. ``interval=1`` computes every step. An explicit per-step ``mask`` overrides both.
"""

from __future__ import annotations

from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule, put, take
from .. import Method
from ..maths import on_mask, on_schedule

SCHEMA = RuleSchema(
    method="static-interval",
    level="step",
    summary="compute the first `warmup` steps, then every `interval`-th; reuse the last output between",
    params={
        "interval": Param(
            "int", 2, "compute every interval-th step after warm-up (1 = every step)", min=1, max=1000
        ),
        "warmup": Param("int", 1, "steps computed in full at the start", min=0, max=100_000),
        "mask": Param(
            "bool_list",
            None,
            "per-step compute mask; overrides interval/warmup; steps past its end compute",
            nullable=True,
        ),
    },
)


class StaticInterval(StepRule):
    def __init__(self, interval: int, warmup: int, mask: list[bool] | None = None):
        self.interval = interval
        self.warmup = warmup
        self.mask = mask

    def computes(self, step: int) -> bool:
        if self.mask is not None:
            return on_mask(step, self.mask)
        return on_schedule(step, self.interval, self.warmup)

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        return self.computes(ctx.step)

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> torch.Tensor:
        # A copy, so a pipeline that edits the returned output in place cannot corrupt the cache.
        return take(state["out"], rows).clone()

    def observe(
        self, ctx: CallContext, state: dict[str, Any], output: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        state["out"] = put(state.get("out"), rows, output, ctx.batch)


METHOD = Method(
    schema=SCHEMA,
    rule=StaticInterval,
    preset="Baseline: compute the first step, then every 2nd; reuse the last output in between.",
    sweep=(
        {},
        {"interval": 3},
    ),
)
