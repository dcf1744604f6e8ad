"""DBCache, the dual-block cache of cache-dit (2025): First-Block Cache generalised to spans.
Always run the first ``fn`` blocks and the last ``bn``; when the first span's residual barely
changed since the last computed step (relative L1 under ``threshold``), add the middle blocks'
cached residual instead of running them.

``fn`` keeps the indicator and the early features live; ``bn`` lets the last blocks correct the
reused middle. ``fn=1, bn=0`` is ``fbcache``. ``mask`` forces computing (true) per step.
``forecast`` > 0 is cache-dit's TaylorSeer calibrator: instead of reusing the middle residual,
extrapolate it per sample through its last ``forecast`` + 1 computed values (in step index), so
the cache holds ``forecast`` + 1 residuals per span.
"""

from __future__ import annotations

from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext
from ...runtime.interfaces import Streams
from .. import Method
from ..threshold import threshold_fit
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
        "forecast": Param(
            "int", 0, "0 reuses the middle residual; 1-2 extrapolates it (TaylorSeer)", min=0, max=2
        ),
    },
)


class DBCache(FBCache):
    def __init__(
        self,
        fn: int,
        bn: int,
        threshold: float,
        max_consecutive: int,
        warmup: int,
        mask: list[bool] | None,
        forecast: int = 0,
    ):
        super().__init__(threshold, max_consecutive, warmup)
        self.fn, self.bn, self.mask, self.forecast = fn, bn, mask, forecast

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> Streams:
        if self.forecast == 0:
            return super().estimate(ctx, state, rows)
        step = float(ctx.step)
        return tuple(
            None if h is None else row_forecast(h, state["xs"], step, rows) for h in state["history"]
        )

    def observe(
        self, ctx: CallContext, state: dict[str, Any], residual: Streams, rows: torch.Tensor | None
    ) -> None:
        super().observe(ctx, state, residual, rows)
        if self.forecast == 0:
            return
        k = self.forecast + 1
        idx = rows if rows is not None else torch.arange(ctx.batch, device=residual[0].device)
        if "history" not in state:
            state["history"] = [
                None
                if r is None
                else torch.zeros((k, ctx.batch, *r.shape[1:]), dtype=r.dtype, device=r.device)
                for r in residual
            ]
            state["xs"] = torch.full((k, ctx.batch), float("nan"), device=residual[0].device)
        # Shift these rows' histories by one and append the new residual and its step.
        for hist, r in zip(state["history"], residual, strict=True):
            if hist is not None:
                hist[:, idx] = torch.cat([hist[1:, idx], r.detach().unsqueeze(0).to(hist.dtype)])
        new_x = torch.full((1, idx.numel()), float(ctx.step), device=state["xs"].device)
        state["xs"][:, idx] = torch.cat([state["xs"][1:, idx], new_x])

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


def row_forecast(
    history: torch.Tensor, xs: torch.Tensor, x: float, rows: torch.Tensor | None
) -> torch.Tensor:
    """Per row, the value at ``x`` of the polynomial through that row's kept values: ``history``
    is (K, batch, ...), ``xs`` (K, batch) their steps (NaN = empty); for ``rows`` (None: all)."""
    if rows is not None:
        history, xs = history.index_select(1, rows), xs.index_select(1, rows)
    weights = row_lagrange_weights(xs, x)
    w = weights.view(*weights.shape, *[1] * (history.dim() - 2)).to(torch.float32)
    return (w * history.float()).sum(0).to(history.dtype)


def row_lagrange_weights(xs: torch.Tensor, x: float) -> torch.Tensor:
    """Per column, the Lagrange weights at ``x`` over that column's known abscissae (NaN rows of
    ``xs`` are unknown and get weight 0): with one known point this is plain reuse."""
    known = ~torch.isnan(xs)
    weights = known.to(torch.float64)
    filled = torch.where(known, xs, torch.zeros_like(xs)).double()
    for i in range(xs.shape[0]):
        for j in range(xs.shape[0]):
            if i != j:
                factor = (x - filled[j]) / torch.where(
                    known[j], filled[i] - filled[j], torch.ones_like(filled[j])
                )
                weights[i] = weights[i] * torch.where(known[j], factor, torch.ones_like(factor))
    return torch.where(known, weights, torch.zeros_like(weights))


def _rows(ctx: CallContext, run: torch.Tensor) -> torch.Tensor:
    return ctx.rows if ctx.rows is not None else torch.arange(run.numel(), device=run.device)


METHOD = Method(
    schema=SCHEMA,
    rule=DBCache,
    preset="DBCache: run the first and the last block; reuse the middle's residual while block 1's holds.",
    sweep=(
        {},
        {"threshold": 0.12, "warmup": 8, "forecast": 1},
        {"threshold": 0.3, "max_consecutive": 4},
    ),
    fits="threshold",
    calibrate=threshold_fit(SCHEMA.method),
)
