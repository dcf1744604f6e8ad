"""BWCache, block-wise caching (Cui et al., 2025, "BWCache: Accelerating Video Diffusion
Transformers through Block-Wise Caching"; ../shared/METHODS.md: 2.24x on video DiTs). Each block
of a video transformer changes at its own pace across steps, so each block decides for itself:
while its input has moved less than ``threshold`` (relative L1, against its input at its last
real run), it answers with that input plus the residual it produced then.

Per block and per call, not per sample (the worst row decides, so no sample is reused past the
threshold); at most ``max_consecutive`` reuses in a row per block, and the first ``warmup`` steps
run every block. One host read per block per step for the decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, PerBlockRule
from ...runtime.interfaces import Streams
from .. import Method
from ..maths import relative_l1

SCHEMA = RuleSchema(
    method="bwcache",
    level="block",
    summary="per block: reuse its residual while its input has moved less than a threshold",
    params={
        "threshold": Param(
            "float", 0.05, "relative L1 change of a block's input under which it reuses", min=0.0, max=10.0
        ),
        "max_consecutive": Param("int", 3, "most reuses in a row per block", min=0, max=100_000),
        "warmup": Param("int", 2, "steps that run every block", min=0, max=100_000),
    },
)


@dataclass
class BlockCaches:
    """Per block index: its input (first stream) and residual at its last run, and reuses since."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    residuals: dict[int, Streams] = field(default_factory=dict)
    reused: dict[int, int] = field(default_factory=dict)


class BWCache(PerBlockRule):
    def __init__(self, threshold: float, max_consecutive: int, warmup: int):
        self.threshold, self.max_consecutive, self.warmup = threshold, max_consecutive, warmup

    def new_state(self) -> BlockCaches:
        return BlockCaches()

    def plan(self, ctx: CallContext, state: BlockCaches, index: int, block_in: Streams) -> bool:
        before = state.inputs.get(index)
        if ctx.step < self.warmup or before is None or before.shape != block_in[0].shape:
            return True
        if state.reused[index] >= self.max_consecutive:
            return True
        run = bool(relative_l1(block_in[0], before).max() >= self.threshold)
        if not run:
            state.reused[index] += 1
        return run

    def estimate(self, ctx: CallContext, state: BlockCaches, index: int, block_in: Streams) -> Streams:
        return state.residuals[index]

    def observe(
        self, ctx: CallContext, state: BlockCaches, index: int, block_in: Streams, residual: Streams
    ) -> None:
        state.inputs[index] = block_in[0].detach().clone()
        state.residuals[index] = tuple(None if r is None else r.detach() for r in residual)
        state.reused[index] = 0


METHOD = Method(
    schema=SCHEMA,
    rule=BWCache,
    preset="BWCache: each block reuses its residual while its input moved under 5% (at most 3 in a row).",
    sweep=({}, {"threshold": 0.15, "max_consecutive": 4}),
)
