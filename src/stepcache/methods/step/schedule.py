"""Planned schedule (the output format of ``stepcache.search``; planning in the spirit of LeMiCa,
Gao et al., 2025, "LeMiCa: Lexicographic Minimax Path Caching for Efficient Diffusion-Based Video
Generation"). A per-step mask says which steps run the network; every other step's output is
extrapolated by the polynomial through the last ``order`` + 1 computed outputs (order 0: reuse),
moved ``damping`` of the way from the last computed output. Given ``weights`` (fitted by the
search on the calibration seeds), a skipped step's output is instead that step's own linear
combination of the last ``order`` + 1 computed outputs, chosen so that the sample after the
step lands nearest the full-compute trajectory (``stepcache.search.fit``).

The mask comes from a planner that chose the steps with the least error on reference
trajectories; with ``order`` 0 on an Euler sampler, leaving a step out equals sampling on the
schedule without that timestep, which is what AutoDiffusion's timestep search chooses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext
from .. import Method
from ..maths import History, combine, on_mask
from .taylorseer import TaylorSeer


def _check(p: Mapping[str, Any]) -> tuple[str, str] | None:
    if not p["mask"] or not p["mask"][0]:
        return "mask", "must be non-empty and compute step 0 (there is nothing to reuse before it)"
    if p["weights"] is not None and len(p["weights"]) != len(p["mask"]) * (p["order"] + 1):
        want, got = len(p["mask"]) * (p["order"] + 1), len(p["weights"])
        return "weights", f"must hold order + 1 weights per step of the mask ({want}), got {got}"
    return None


SCHEMA = RuleSchema(
    method="schedule",
    level="step",
    summary="compute the steps the mask marks; extrapolate the others with order 0 (reuse) to 3",
    params={
        "mask": Param("bool_list", [True], "per-step compute mask; steps past its end compute"),
        "order": Param(
            "int", 1, "extrapolation order over the last computed outputs (0: reuse)", min=0, max=3
        ),
        "expansion": Param(
            "str",
            "polynomial",
            "the polynomial through the points, or TaylorSeer's own expansion (diffusers' form)",
            choices=("polynomial", "taylor"),
        ),
        "variable": Param(
            "str", "timestep", "extrapolate in step index or in timestep", choices=("step", "timestep")
        ),
        "damping": Param(
            "float",
            1.0,
            "how far the forecast moves from the last computed output, as a fraction of the "
            "extrapolation's step (1: the extrapolation; 0: reuse)",
            min=0.0,
            max=1.5,
        ),
        "weights": Param(
            "float_list",
            None,
            "per step, order + 1 weights of the last computed outputs (oldest first) that replace "
            "the forecast on skipped steps (fitted by the search; null: the forecast)",
            min=-1000.0,
            max=1000.0,
            nullable=True,
        ),
    },
    check=_check,
)


class Schedule(TaylorSeer):
    """TaylorSeer's history and polynomial forecast (order 0 reuses), on a per-step mask."""

    # Set only by the search's fitting run: a skipped step's weights, asked for when it is reached.
    fitter: Callable[[int, int], list[float]] | None = None

    def __init__(
        self,
        mask: list[bool],
        order: int,
        variable: str,
        expansion: str = "polynomial",
        damping: float = 1.0,
        weights: list[float] | None = None,
    ):
        super().__init__(interval=1, order=order, warmup=0, variable=variable, expansion=expansion)
        self.mask = list(mask)
        self.damping = damping
        self.weights = None if weights is None else list(weights)  # the fitting run writes into it

    def plan(self, ctx: CallContext, state: History) -> bool:
        return on_mask(ctx.step, self.mask) or not state.outputs

    def estimate(self, ctx: CallContext, state: History, rows: torch.Tensor | None) -> torch.Tensor:
        k = self.order + 1
        # Fitted for a full history: while it is shorter (a skip right after step 0), the forecast.
        if ctx.step >= len(self.mask) or len(state.outputs) < k:
            return super().estimate(ctx, state, rows)
        if self.fitter is not None:
            if self.weights is None:
                self.weights = [0.0] * (len(self.mask) * k)
            self.weights[ctx.step * k : (ctx.step + 1) * k] = self.fitter(ctx.step, k)
        if self.weights is None:
            return super().estimate(ctx, state, rows)
        out = combine(state.outputs[-k:], self.weights[ctx.step * k : (ctx.step + 1) * k])
        return out if rows is None else out.index_select(0, rows)


METHOD = Method(
    schema=SCHEMA,
    rule=Schedule,
    preset=(
        "Planned schedule (what `stepcache search` writes): a per-step compute mask, the rest extrapolated."
    ),
    preset_params={"mask": [True, True, True, True] + [True, False] * 8},
    sweep=(),
)
