"""DBCache, the dual-block cache of cache-dit (2025): First-Block Cache generalised to spans.
Always run the first ``fn`` blocks and the last ``bn``; when the first span's residual barely
changed since the last computed step (relative L1 under ``threshold``), add the middle blocks'
cached residual instead of running them.

``fn`` keeps the indicator and the early features live; ``bn`` lets the last blocks correct the
reused middle. ``fn=1, bn=0`` is ``fbcache``. ``mask`` forces computing (true) per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext
from ...runtime.interfaces import Streams
from .. import register_method
from .fbcache import FBCache

SCHEMA = RuleSchema(
    method="dbcache",
    level="block",
    summary="run the first Fn and last Bn blocks; reuse the middle's residual while the Fn residual holds",
    params={
        "fn": Param("int", 1, "leading blocks always computed (the indicator is their residual)", min=1),
        "bn": Param("int", 1, "trailing blocks always computed", min=0),
        "threshold": Param(
            "float", 0.08, "relative-L1 change of the Fn residual under which the middle is reused", min=0.0
        ),
        "max_consecutive": Param("int", 3, "cap on consecutive reused steps per sample", min=0, max=100_000),
        "warmup": Param("int", 1, "steps always computed at the start", min=0, max=100_000),
        "mask": Param(
            "bool_list",
            None,
            "per-step: true forces the middle to run (steps past its end follow the rule)",
            nullable=True,
        ),
    },
)


class DBCache(FBCache):
    def __init__(
        self, fn: int, bn: int, threshold: float, max_consecutive: int, warmup: int, mask: list[bool] | None
    ):
        super().__init__(threshold, max_consecutive, warmup)
        self.fn, self.bn, self.mask = fn, bn, mask

    def span(self, num_blocks: int) -> tuple[int, int]:
        head_end = min(self.fn, num_blocks)
        return head_end, max(head_end, num_blocks - self.bn)

    def plan(self, ctx: CallContext, state: dict[str, Any], head_residual: Streams) -> bool | torch.Tensor:
        run = super().plan(ctx, state, head_residual)
        if self.mask is not None and ctx.step < len(self.mask) and self.mask[ctx.step]:
            if isinstance(run, torch.Tensor):  # keep the consecutive-reuse counter honest
                state["reused"] = state["reused"].index_fill(0, _rows(ctx, run), 0)
            return True
        return run


def _rows(ctx: CallContext, run: torch.Tensor) -> torch.Tensor:
    return ctx.rows if ctx.rows is not None else torch.arange(run.numel(), device=run.device)


def _factory(p: Mapping[str, Any]) -> DBCache:
    return DBCache(p["fn"], p["bn"], p["threshold"], p["max_consecutive"], p["warmup"], p["mask"])


register_method(SCHEMA, _factory)
