"""TaylorSeer, feature level (Liu et al., 2025, "From Reusing to Forecasting: Accelerating
Diffusion Models with TaylorSeers"). The block stack's middle residual moves smoothly across
steps: compute it every ``interval``-th step and forecast it on the others with an
order-``order`` expansion, while the first ``fn`` and last ``bn`` blocks run live. An explicit
per-step ``mask`` replaces the interval schedule (the search's steps, forecast inside the model).

One history per stream of the middle span (not per block): memory is ``order + 1`` residuals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import BlockRule, CallContext
from ...runtime.interfaces import Streams
from .. import register_method
from ..step.extrapolation import History
from ..step.static_interval import on_mask, on_schedule

SCHEMA = RuleSchema(
    method="taylorseer-feature",
    level="block",
    summary="compute the middle blocks every `interval`-th step; forecast their residual in between",
    params={
        "interval": Param(
            "int", 3, "compute the middle every interval-th step after warm-up", min=1, max=1000
        ),
        "order": Param("int", 2, "expansion order (paper default 2; 0 = plain reuse)", min=0, max=3),
        "warmup": Param("int", 3, "steps computed in full at the start", min=0, max=100_000),
        "fn": Param("int", 0, "leading blocks always computed", min=0),
        "bn": Param("int", 0, "trailing blocks always computed", min=0),
        "mask": Param(
            "bool_list",
            None,
            "per-step mask of the steps that compute the middle; overrides interval/warmup",
            nullable=True,
        ),
    },
)


class TaylorSeerFeature(BlockRule):
    wants_signal = False  # a fixed schedule

    def __init__(
        self, interval: int, order: int, warmup: int, fn: int, bn: int, mask: list[bool] | None = None
    ):
        self.interval, self.order, self.warmup, self.fn, self.bn = interval, order, warmup, fn, bn
        self.mask = mask

    def span(self, num_blocks: int) -> tuple[int, int]:
        head_end = min(self.fn, num_blocks)
        return head_end, max(head_end, num_blocks - self.bn)

    def plan(self, ctx: CallContext, state: dict[str, Any], head_residual: Streams) -> bool:
        if "streams" not in state:
            return True
        if self.mask is not None:
            return on_mask(ctx.step, self.mask)
        return on_schedule(ctx.step, self.interval, self.warmup)

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> Streams:
        out = []
        for history in state["streams"]:
            if history is None:
                out.append(None)
                continue
            value = History(history, self.order + 1).forecast(float(ctx.step), self.order)
            out.append(value if rows is None else value.index_select(0, rows))
        return tuple(out)

    def observe(
        self, ctx: CallContext, state: dict[str, Any], residual: Streams, rows: torch.Tensor | None
    ) -> None:
        if rows is not None:  # a fixed schedule decides for the whole batch
            return
        if "streams" not in state:
            state["streams"] = [None if r is None else {} for r in residual]
        for history, r in zip(state["streams"], residual, strict=True):
            if history is not None and r is not None:
                History(history, self.order + 1).add(float(ctx.step), r)


def _factory(p: Mapping[str, Any]) -> TaylorSeerFeature:
    return TaylorSeerFeature(p["interval"], p["order"], p["warmup"], p["fn"], p["bn"], p["mask"])


register_method(SCHEMA, _factory)
