"""Δ-DiT (Chen et al., 2024, "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion
Transformers"). Front blocks shape the outline, back blocks the details: in the early (outline)
steps reuse the cached deviation (output minus input) of the back blocks, in the late (detail)
steps that of the front blocks, recomputing the cached span every ``interval``-th step.

``boundary`` is the stage switch as a fraction of the steps (the paper's b, in timesteps); each
stage keeps its own cache, so the first step of a stage always computes.
"""

from __future__ import annotations

from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import BlockRule, CallContext, put_streams, take_streams
from ...runtime.interfaces import Streams
from .. import Method
from ..maths import on_schedule

SCHEMA = RuleSchema(
    method="delta-dit",
    level="block",
    summary="reuse the back blocks' deviation early and the front blocks' late, every `interval` steps",
    params={
        "blocks": Param("int", 2, "how many blocks the cached span holds (front or back)", min=1),
        "interval": Param("int", 2, "recompute the cached span every interval-th step", min=1, max=1000),
        "boundary": Param("float", 0.5, "fraction of the steps where the outline stage ends", min=0, max=1),
        "warmup": Param("int", 1, "steps always computed at the start", min=0, max=100_000),
    },
)


class DeltaDiT(BlockRule):
    wants_signal = False  # a fixed schedule

    def __init__(self, blocks: int, interval: int, boundary: float, warmup: int):
        self.blocks, self.interval, self.boundary, self.warmup = blocks, interval, boundary, warmup

    def _early(self, ctx: CallContext) -> bool:
        return bool(ctx.num_steps) and ctx.step < self.boundary * ctx.num_steps

    def span(self, num_blocks: int) -> tuple[int, int]:
        return 0, min(self.blocks, num_blocks)

    def span_at(self, num_blocks: int, ctx: CallContext) -> tuple[int, int]:
        k = min(self.blocks, num_blocks)
        return (num_blocks - k, num_blocks) if self._early(ctx) else (0, k)

    def plan(self, ctx: CallContext, state: dict[str, Any], head_residual: Streams) -> bool:
        if ("residual", self._early(ctx)) not in state:
            return True
        return on_schedule(ctx.step, self.interval, self.warmup)

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> Streams:
        return take_streams(state["residual", self._early(ctx)], rows)

    def observe(
        self, ctx: CallContext, state: dict[str, Any], residual: Streams, rows: torch.Tensor | None
    ) -> None:
        key = ("residual", self._early(ctx))
        state[key] = put_streams(state.get(key), rows, residual, ctx.batch)


METHOD = Method(
    schema=SCHEMA,
    rule=DeltaDiT,
    preset=(
        "Delta-DiT: reuse the back 2 blocks' deviation in the first half, the front 2's after; "
        "every 2nd step."
    ),
    sweep=(),
)
