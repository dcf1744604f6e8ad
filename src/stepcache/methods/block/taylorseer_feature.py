"""TaylorSeer, feature level (Liu et al., 2025, "From Reusing to Forecasting: Accelerating
Diffusion Models with TaylorSeers"). The block stack's middle residual moves smoothly across
steps: compute it every ``interval``-th step and forecast it on the others with an
order-``order`` expansion, while the first ``fn`` and last ``bn`` blocks run live. An explicit
per-step ``mask`` replaces the interval schedule (the search's steps, forecast inside the model).

One history per stream of the middle span (not per block): memory is ``order + 1`` residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...policy import Param, RuleSchema
from ...runtime import BlockRule, CallContext
from ...runtime.interfaces import Streams
from .. import Method
from ..maths import History, on_mask, on_schedule

SCHEMA = RuleSchema(
    method="taylorseer-feature",
    level="block",
    summary="compute the middle blocks every `interval`-th step; forecast their residual in between",
    params={
        "interval": Param(
            "int", 3, "compute the middle every interval-th step after warm-up", min=1, max=1000
        ),
        "order": Param("int", 2, "expansion order (paper default 2; 0 = plain reuse)", min=0, max=3),
        "expansion": Param(
            "str",
            "polynomial",
            "the polynomial through the points, or TaylorSeer's own expansion (diffusers' form)",
            choices=("polynomial", "taylor"),
        ),
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


@dataclass
class StreamHistories:
    """Per hidden stream of the middle span, its residual history (None: a stream it lacks)."""

    streams: list[History | None] | None = None


class TaylorSeerFeature(BlockRule):
    wants_signal = False  # a fixed schedule

    def __init__(
        self,
        interval: int,
        order: int,
        warmup: int,
        fn: int,
        bn: int,
        mask: list[bool] | None = None,
        expansion: str = "polynomial",
    ):
        self.interval, self.order, self.warmup, self.fn, self.bn = interval, order, warmup, fn, bn
        self.expansion = expansion
        self.mask = mask

    def span(self, num_blocks: int) -> tuple[int, int]:
        head_end = min(self.fn, num_blocks)
        return head_end, max(head_end, num_blocks - self.bn)

    def new_state(self) -> StreamHistories:
        return StreamHistories()

    def plan(self, ctx: CallContext, state: StreamHistories, head_residual: Streams) -> bool:
        return state.streams is None or self.computes(ctx.step)

    def computes(self, step: int) -> bool:
        """Whether the schedule runs the middle at ``step`` (once a residual has been observed)."""
        if self.mask is not None:
            return on_mask(step, self.mask)
        return on_schedule(step, self.interval, self.warmup)

    def estimate(self, ctx: CallContext, state: StreamHistories, rows: torch.Tensor | None) -> Streams:
        assert state.streams is not None  # plan computes until the first residual is observed
        out = []
        for history in state.streams:
            if history is None:
                out.append(None)
                continue
            value = history.forecast(float(ctx.step), self.order, self.expansion)
            out.append(value if rows is None else value.index_select(0, rows))
        return tuple(out)

    def observe(
        self, ctx: CallContext, state: StreamHistories, residual: Streams, rows: torch.Tensor | None
    ) -> None:
        if rows is not None:  # a fixed schedule decides for the whole batch
            return
        if state.streams is None:
            state.streams = [None if r is None else History(self.order + 1) for r in residual]
        for history, r in zip(state.streams, residual, strict=True):
            if history is not None and r is not None:
                history.add(float(ctx.step), r)


METHOD = Method(
    schema=SCHEMA,
    rule=TaylorSeerFeature,
    preset=(
        "TaylorSeer (feature level): the block stack every 3rd step; its residual forecast, order 2, between."
    ),
    sweep=(
        {},
        {"order": 1},
    ),
)
