"""Planned schedule (the output format of ``stepcache.search``; planning in the spirit of LeMiCa,
Gao et al., 2025, "LeMiCa: Lexicographic Minimax Path Caching for Efficient Diffusion-Based Video
Generation"). A per-step mask says which steps run the network; every other step's output is
extrapolated by the polynomial through the last ``order`` + 1 computed outputs (order 0: reuse),
moved ``damping`` of the way from the last computed output.

The mask comes from a planner that chose the steps with the least error on reference
trajectories; with ``order`` 0 on an Euler sampler, leaving a step out equals sampling on the
schedule without that timestep, which is what AutoDiffusion's timestep search chooses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...policy import Param, RuleSchema
from ...runtime import CallContext
from .. import Method
from ..maths import History, on_mask
from .taylorseer import TaylorSeer


def _check(p: Mapping[str, Any]) -> tuple[str, str] | None:
    if not p["mask"] or not p["mask"][0]:
        return "mask", "must be non-empty and compute step 0 (there is nothing to reuse before it)"
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
    },
    check=_check,
)


class Schedule(TaylorSeer):
    """TaylorSeer's history and polynomial forecast (order 0 reuses), on a per-step mask."""

    def __init__(
        self, mask: list[bool], order: int, variable: str, expansion: str = "polynomial", damping: float = 1.0
    ):
        super().__init__(interval=1, order=order, warmup=0, variable=variable, expansion=expansion)
        self.mask = list(mask)
        self.damping = damping

    def plan(self, ctx: CallContext, state: History) -> bool:
        return on_mask(ctx.step, self.mask) or not state.outputs


METHOD = Method(
    schema=SCHEMA,
    rule=Schedule,
    preset=(
        "Planned schedule (what `stepcache search` writes): a per-step compute mask, the rest extrapolated."
    ),
    preset_params={"mask": [True, True, True, True] + [True, False] * 8},
    sweep=(),
)
