"""First-Block Cache (FBCache; ParaAttention / diffusers FirstBlockCache, as in TeaCache's line of work).

Always run the first block; if its residual changed little (relative L1) since the last computed
step, skip the remaining blocks and add their cached residual instead. Decided per sample.
"""

from __future__ import annotations

from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import BlockRule, CallContext, put, put_streams, take, take_streams
from ...runtime.interfaces import Streams
from .. import Method
from ..maths import relative_l1
from ..threshold import threshold_fit

SCHEMA = RuleSchema(
    method="fbcache",
    level="block",
    summary="run the first block; reuse the rest's residual while the first block's residual barely moves",
    params={
        "threshold": Param(
            "float",
            0.08,
            "relative-L1 change of the first block's residual under which the rest is reused",
            min=0.0,
            max=10.0,
        ),
        "max_consecutive": Param("int", 3, "cap on consecutive reused steps per sample", min=0, max=100_000),
        "warmup": Param("int", 1, "steps always computed at the start", min=0, max=100_000),
    },
)


class FBCache(BlockRule):
    def __init__(self, threshold: float, max_consecutive: int, warmup: int):
        self.threshold = threshold
        self.max_consecutive = max_consecutive
        self.warmup = warmup

    def span(self, num_blocks: int) -> tuple[int, int]:
        return 1, num_blocks

    def plan(self, ctx: CallContext, state: dict[str, Any], head_residual: Streams) -> bool | torch.Tensor:
        head = head_residual[0]
        state["head_now"] = put(state.get("head_now"), ctx.rows, head, ctx.batch)
        if "head" not in state or ctx.step < self.warmup or self.max_consecutive == 0:
            return True
        change = relative_l1(head, take(state["head"], ctx.rows))
        reused = take(state["reused"], ctx.rows)
        run = (change >= self.threshold) | (reused >= self.max_consecutive)
        state["reused"] = put(state["reused"], ctx.rows, torch.where(run, 0, reused + 1), ctx.batch)
        return run

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> Streams:
        return take_streams(state["residual"], rows)

    def observe(
        self, ctx: CallContext, state: dict[str, Any], residual: Streams, rows: torch.Tensor | None
    ) -> None:
        state["residual"] = put_streams(state.get("residual"), rows, residual, ctx.batch)
        state["head"] = put(state.get("head"), rows, take(state["head_now"], rows), ctx.batch)
        if "reused" not in state:
            state["reused"] = torch.zeros(ctx.batch, dtype=torch.long, device=residual[0].device)


METHOD = Method(
    schema=SCHEMA,
    rule=FBCache,
    preset=(
        "First-Block Cache: run block 1; reuse the rest's residual while block 1's residual barely changes."
    ),
    sweep=(
        {},
        {"threshold": 0.3, "max_consecutive": 4},
    ),
    fits="threshold",
    calibrate=threshold_fit(SCHEMA.method),
)
