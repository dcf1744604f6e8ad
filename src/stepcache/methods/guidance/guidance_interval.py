"""Guidance interval (Kynkäänniemi et al., 2024, "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models"). Run classifier-free guidance only
inside an interval of the sampling trajectory; outside it, one (conditional) pass per step.

The interval is given as fractions of the step count (0 = the first, noisiest step), which holds
for any scheduler; the paper states it in noise levels. Without a known step count (a bare loop
that did not say ``num_steps``), guidance always runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, GuidanceRule
from .. import Method


def _check(p: Mapping[str, Any]) -> tuple[str, str] | None:
    if p["start"] >= p["end"]:
        return "end", f"must be greater than start ({p['start']}), got {p['end']}"
    return None


SCHEMA = RuleSchema(
    method="guidance-interval",
    level="guidance",
    summary="classifier-free guidance only for steps inside [start, end) of the schedule",
    params={
        "start": Param(
            "float", 0.0, "first fraction of the schedule with guidance (0 = first step)", min=0, max=1
        ),
        "end": Param("float", 0.7, "fraction of the schedule where guidance stops (1 = never)", min=0, max=1),
    },
    check=_check,
)


class GuidanceInterval(GuidanceRule):
    def __init__(self, start: float, end: float):
        self.start, self.end = start, end

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        if not ctx.num_steps:
            return True
        where = ctx.step / ctx.num_steps
        return self.start <= where < self.end

    def estimate(
        self, ctx: CallContext, state: dict[str, Any], cond: torch.Tensor, pairs: torch.Tensor
    ) -> torch.Tensor:
        return cond.clone()  # guided output = conditional output

    def observe(
        self,
        ctx: CallContext,
        state: dict[str, Any],
        cond: torch.Tensor,
        uncond: torch.Tensor,
        pairs: torch.Tensor,
    ) -> None:
        pass  # the interval needs no memory


METHOD = Method(
    schema=SCHEMA,
    rule=GuidanceInterval,
    preset="Guidance interval: classifier-free guidance only in the first 70% of the steps.",
    sweep=(),
)
