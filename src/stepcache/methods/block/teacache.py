"""TeaCache (Liu et al., 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model"). How much the first block's timestep-modulated input changes predicts how much the
output changes: accumulate that change, rescaled by a fitted polynomial, and reuse the block
stack's cached residual until the sum passes ``threshold``.

A block rule over the whole stack (span (0, N)): only the embeddings and the modulation run on
a skipped step. Decided per sample. ``coefficients`` come from ``stepcache calibrate teacache``
(numpy order, highest degree first); without them the change is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import BlockRule, CallContext, RuleSet, put, put_streams, take, take_streams
from ...runtime.interfaces import Streams
from .. import Method
from ..maths import relative_l1

SCHEMA = RuleSchema(
    method="teacache",
    level="block",
    summary="skip the blocks until the rescaled change of the modulated input adds up to a threshold",
    params={
        "threshold": Param(
            "float",
            0.15,
            "accumulated rescaled relative-L1 change that forces a computation",
            min=0.0,
            max=100.0,
        ),
        "warmup": Param("int", 1, "steps always computed at the start", min=0, max=100_000),
        "max_consecutive": Param(
            "int", None, "cap on consecutive skipped steps per sample (null: none)", min=0, nullable=True
        ),
        "coefficients": Param(
            "float_list",
            None,
            "rescaling polynomial, highest degree first (`stepcache calibrate teacache`); null: identity",
            nullable=True,
        ),
    },
)


def rescale(x: torch.Tensor, coefficients: list[float] | None) -> torch.Tensor:
    if not coefficients:
        return x
    out = torch.zeros_like(x)
    for c in coefficients:  # Horner
        out = out * x + c
    return out


class TeaCache(BlockRule):
    def __init__(
        self, threshold: float, warmup: int, max_consecutive: int | None, coefficients: list[float] | None
    ):
        self.threshold, self.warmup, self.max_consecutive = threshold, warmup, max_consecutive
        self.coefficients = coefficients

    def span(self, num_blocks: int) -> tuple[int, int]:
        return 0, num_blocks

    def plan(self, ctx: CallContext, state: dict[str, Any], head_residual: Streams) -> bool | torch.Tensor:
        modulated = head_residual[0]
        before = state.get("modulated")
        state["modulated"] = put(before, ctx.rows, modulated, ctx.batch)
        if before is None or "residual" not in state or ctx.step < self.warmup:
            return True
        acc = take(state["acc"], ctx.rows) + rescale(
            relative_l1(modulated, take(before, ctx.rows)), self.coefficients
        )
        skips = take(state["skips"], ctx.rows)
        run = (acc >= self.threshold) | ~take(state["seen"], ctx.rows)
        if self.max_consecutive is not None:
            run |= skips >= self.max_consecutive
        state["acc"] = put(state["acc"], ctx.rows, torch.where(run, 0.0, acc), ctx.batch)
        state["skips"] = put(state["skips"], ctx.rows, torch.where(run, 0, skips + 1), ctx.batch)
        return run

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> Streams:
        return take_streams(state["residual"], rows)

    def observe(
        self, ctx: CallContext, state: dict[str, Any], residual: Streams, rows: torch.Tensor | None
    ) -> None:
        state["residual"] = put_streams(state.get("residual"), rows, residual, ctx.batch)
        if "acc" not in state:
            dev = residual[0].device
            state["acc"] = torch.zeros(ctx.batch, device=dev)
            state["skips"] = torch.zeros(ctx.batch, dtype=torch.long, device=dev)
            state["seen"] = torch.zeros(ctx.batch, dtype=torch.bool, device=dev)
        n = residual[0].shape[0]
        state["seen"] = put(
            state["seen"], rows, torch.ones(n, dtype=torch.bool, device=residual[0].device), ctx.batch
        )


def fit_coefficients(stack: Any, degree: int = 4) -> list[float]:
    """Polynomial (highest degree first) from the modulated input's relative-L1 change between
    consecutive steps to the stack residual's, pooled over samples (``stack``: a StackRecorder)."""
    import numpy as np

    xs, ys = [], []
    last: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
    for (branch, step, mod), res in zip(stack.calls, stack.residuals, strict=True):
        prev = last.get(branch)
        if prev is not None and prev[0] == step - 1 and prev[1].shape == mod.shape:
            xs.append(relative_l1(mod, prev[1]))
            ys.append(relative_l1(res, prev[2]))
        last[branch] = (step, mod, res)
    if len(xs) < degree + 1:
        raise ValueError("calibrate teacache: too few consecutive steps recorded to fit the polynomial")
    x, y = torch.cat(xs).double().numpy(), torch.cat(ys).double().numpy()
    return [float(c) for c in np.polyfit(x, y, degree)]


def fit(pipe: Any, run: Callable[[], Any], params: Mapping[str, Any]) -> list[float]:
    """The calibration hook: the rescaling polynomial from full-compute runs."""
    from ...calibration import StackRecorder, record

    stack = StackRecorder()
    record(pipe, run, RuleSet(block=stack))
    return fit_coefficients(stack)


METHOD = Method(
    schema=SCHEMA,
    rule=TeaCache,
    preset="TeaCache: skip all blocks until the first block's modulated input has changed by 0.15 in sum.",
    sweep=(
        {},
        {"threshold": 0.4},
    ),
    fits="coefficients",
    calibrate=fit,
)
