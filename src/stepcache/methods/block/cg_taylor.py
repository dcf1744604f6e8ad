"""CG-Taylor, confidence-gated Taylor forecasting (../shared/METHODS.md: FLUX 3.17x, Wan
4.14x). Forecasting the middle blocks' residual is only as good as the trajectory is smooth
*now*, and a cheap probe says whether it is: the first ``fn`` blocks run every step, their own
residual is forecast from the same computed steps as the middle's, and where that forecast is
close (relative L1 error under ``threshold``) the middle is trusted to its forecast too, per
sample; elsewhere it runs. The method's probe is the last block; a skip decided before the middle
runs can only read blocks before it, so here the probe is the first span.

Unlike DBCache, which skips while the probe barely *changes*, this skips while the probe is
*predictable*: a feature moving steadily is forecast, not recomputed.
"""

from __future__ import annotations

from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, put, take
from ...runtime.interfaces import Streams
from .. import Method
from ..maths import relative_l1
from .dbcache import DBCache, row_forecast

SCHEMA = RuleSchema(
    method="cg-taylor",
    level="block",
    summary="forecast the middle blocks' residual while the first blocks' own forecast holds",
    params={
        "fn": Param("int", 1, "leading blocks always computed: the probe", min=1),
        "bn": Param("int", 1, "trailing blocks always computed", min=0),
        "threshold": Param(
            "float", 0.1, "probe forecast error (relative L1) under which the middle is forecast", min=0.0
        ),
        "order": Param("int", 1, "forecast order over the last computed steps (1-2)", min=1, max=2),
        "max_consecutive": Param("int", 3, "most forecast steps in a row per sample", min=0, max=100_000),
        "warmup": Param("int", 3, "steps always computed at the start", min=0, max=100_000),
    },
)


class CGTaylor(DBCache):
    def __init__(self, fn: int, bn: int, threshold: float, order: int, max_consecutive: int, warmup: int):
        super().__init__(fn, bn, threshold, max_consecutive, warmup, mask=None, forecast=order)

    def plan(self, ctx: CallContext, state: dict[str, Any], head_residual: Streams) -> bool | torch.Tensor:
        head = head_residual[0]
        state["head_now"] = put(state.get("head_now"), ctx.rows, head, ctx.batch)
        if "probe" not in state or ctx.step < self.warmup or self.max_consecutive == 0:
            return True
        error = relative_l1(head, row_forecast(state["probe"], state["xs"], float(ctx.step), ctx.rows))
        reused = take(state["reused"], ctx.rows)
        run = (error >= self.threshold) | (reused >= self.max_consecutive)
        state["reused"] = put(state["reused"], ctx.rows, torch.where(run, 0, reused + 1), ctx.batch)
        return run

    def observe(
        self, ctx: CallContext, state: dict[str, Any], residual: Streams, rows: torch.Tensor | None
    ) -> None:
        super().observe(ctx, state, residual, rows)  # the middle's history and its steps
        head = take(state["head_now"], rows)
        idx = rows if rows is not None else torch.arange(ctx.batch, device=head.device)
        if "probe" not in state:  # the probe's history, kept in step with the middle's
            state["probe"] = torch.zeros((self.forecast + 1, ctx.batch, *head.shape[1:]), dtype=head.dtype)
            state["probe"] = state["probe"].to(head.device)
        probe = state["probe"]
        probe[:, idx] = torch.cat([probe[1:, idx], head.detach().unsqueeze(0).to(probe.dtype)])


METHOD = Method(
    schema=SCHEMA,
    rule=CGTaylor,
    preset="CG-Taylor: forecast the middle blocks while block 1's own forecast is within 10%; else run them.",
    sweep=({}, {"threshold": 0.25, "max_consecutive": 4}),
)
