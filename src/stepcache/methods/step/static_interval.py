"""Static interval: the fixed-schedule baseline every other method must beat.

Compute the first ``warmup`` steps, then every ``interval``-th step; in between return the last
computed output. ``interval=1`` computes every step. An explicit per-step ``mask`` overrides both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule, put, take
from .. import register_method

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


def on_schedule(step: int, interval: int, warmup: int) -> bool:
    """The fixed schedule shared by the interval methods: the first ``warmup`` steps, then every
    ``interval``-th."""
    return step < warmup or (step - warmup) % interval == 0


def on_mask(step: int, mask: list[bool]) -> bool:
    """A per-step compute mask's answer; steps past its end compute."""
    return step >= len(mask) or mask[step]


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


def _factory(p: Mapping[str, Any]) -> StaticInterval:
    return StaticInterval(p["interval"], p["warmup"], p["mask"])


register_method(SCHEMA, _factory)
