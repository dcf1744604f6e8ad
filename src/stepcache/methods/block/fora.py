"""FORA (Selvaraju et al., 2024, "FORA: Fast-Forward Caching in Diffusion Transformer
Acceleration"). The attention and MLP outputs of every transformer block barely change between
neighbouring steps: compute them every ``interval``-th step and reuse them in between, while
norms, modulation, gates and residual additions run live with the current timestep.

Memory: one output per attention / feed-forward layer (what the method caches by design).
"""

from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...policy import Param, RuleSchema
from ...runtime import BranchRule, CallContext
from .. import Method
from ..maths import on_schedule

SCHEMA = RuleSchema(
    method="fora",
    level="block",
    summary="reuse every block's attention and MLP outputs; recompute them every `interval`-th step",
    params={
        "interval": Param(
            "int", 3, "recompute the layers every interval-th step (paper: 3)", min=1, max=1000
        ),
        "warmup": Param("int", 1, "steps computed in full at the start", min=0, max=100_000),
    },
)


class Fora(BranchRule):
    def __init__(self, interval: int, warmup: int):
        self.interval, self.warmup = interval, warmup

    def modules(self, adapter: Any, model: Any) -> tuple[list[Any], list[Any]]:
        layers = adapter.feature_modules()
        if not layers:
            raise UnsupportedModelError(
                f"fora caches transformer blocks' attention and MLP layers, and {type(model).__name__} "
                f"({adapter.family}) has none"
            )
        return layers, []

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        return on_schedule(ctx.step, self.interval, self.warmup)


METHOD = Method(
    schema=SCHEMA,
    rule=Fora,
    preset="FORA: every block's attention and MLP outputs recomputed every 3rd step, reused in between.",
)
