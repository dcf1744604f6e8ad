"""CFG cache (Lv et al., 2024, "FasterCache: Training-Free Video Diffusion Model Acceleration
with High Quality"). The guidance direction ``c - u`` drifts slowly across steps: compute both
passes every ``interval``-th step and in between estimate ``u = c - (c - u)_cached``.

We keep the difference whole (FasterCache also splits it into low/high frequencies and weights
them by step). ``max_drift`` refreshes a sample early when its conditional output moved by more
than that relative L1 since the difference was cached (a step late: it is measured on the step
that used the cache).
"""

from __future__ import annotations

from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, GuidanceRule, put, take
from .. import Method
from ..maths import on_mask, on_schedule

SCHEMA = RuleSchema(
    method="cfg-cache",
    level="guidance",
    summary="compute the unconditional pass every `interval`-th step; reuse the cached c - u between",
    params={
        "interval": Param(
            "int", 2, "compute both passes every interval-th step after warm-up", min=1, max=1000
        ),
        "warmup": Param("int", 2, "steps that always run guidance", min=0, max=100_000),
        "mask": Param(
            "bool_list",
            None,
            "per-step: true runs both passes; overrides interval/warmup; steps past its end run both",
            nullable=True,
        ),
        "max_drift": Param(
            "float",
            None,
            "refresh a sample whose conditional output moved by more than this relative L1 (null: never)",
            min=0.0,
            nullable=True,
        ),
    },
)


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().mean(1) / b.flatten(1).abs().mean(1).clamp_min(1e-8)


class CfgCache(GuidanceRule):
    def __init__(self, interval: int, warmup: int, max_drift: float | None, mask: list[bool] | None = None):
        self.interval, self.warmup, self.max_drift, self.mask = interval, warmup, max_drift, mask

    def _scheduled(self, step: int) -> bool:
        if self.mask is not None:
            return on_mask(step, self.mask)
        return on_schedule(step, self.interval, self.warmup)

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool | torch.Tensor:
        if "delta" not in state or self._scheduled(ctx.step):
            return True
        return state["need"]  # pairs never cached (their rows were a step rule's) or drifted

    def estimate(
        self, ctx: CallContext, state: dict[str, Any], cond: torch.Tensor, pairs: torch.Tensor
    ) -> torch.Tensor:
        if self.max_drift is not None:
            state["need"][pairs] = _rel_l1(cond, take(state["cond"], pairs)) > self.max_drift
        return cond - take(state["delta"], pairs).to(cond.dtype)

    def observe(
        self,
        ctx: CallContext,
        state: dict[str, Any],
        cond: torch.Tensor,
        uncond: torch.Tensor,
        pairs: torch.Tensor,
    ) -> None:
        n = ctx.batch // 2
        state["delta"] = put(state.get("delta"), pairs, cond - uncond, n)
        if "need" not in state:
            state["need"] = torch.ones(n, dtype=torch.bool, device=cond.device)
        state["need"][pairs] = False
        if self.max_drift is not None:
            state["cond"] = put(state.get("cond"), pairs, cond, n)


METHOD = Method(
    schema=SCHEMA,
    rule=CfgCache,
    preset="FasterCache's CFG cache: unconditional pass every 2nd step; reuse the cached c - u between.",
)
