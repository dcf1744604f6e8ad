"""Planned schedule (the output format of ``stepcache.search``; planning in the spirit of LeMiCa,
Gao et al., 2025, "LeMiCa: Lexicographic Minimax Path Caching for Efficient Diffusion-Based Video
Generation"). A per-step mask says which steps run the network; every other step's output is
extrapolated by the polynomial through the last ``order`` + 1 computed outputs (order 0: reuse).

The mask comes from a planner that chose the steps with the least error on reference
trajectories; with ``order`` 0 on an Euler sampler, leaving a step out equals sampling on the
schedule without that timestep, which is what AutoDiffusion's timestep search chooses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule
from .. import register_method
from .extrapolation import History


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
        "variable": Param(
            "str", "timestep", "extrapolate in step index or in timestep", choices=("step", "timestep")
        ),
    },
    check=_check,
)


class Schedule(StepRule):
    def __init__(self, mask: list[bool], order: int, variable: str):
        self.mask, self.order, self.variable = list(mask), order, variable

    def _x(self, ctx: CallContext) -> float:
        return float(ctx.step) if self.variable == "step" else ctx.timestep_value()

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        return ctx.step >= len(self.mask) or self.mask[ctx.step] or not state.get("outputs")

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> torch.Tensor:
        out = History(state, self.order + 1).forecast(self._x(ctx), self.order)
        return out if rows is None else out.index_select(0, rows)

    def observe(
        self, ctx: CallContext, state: dict[str, Any], output: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        if rows is None:  # a fixed schedule decides for the whole batch
            History(state, self.order + 1).add(self._x(ctx), output)


def _factory(p: Mapping[str, Any]) -> Schedule:
    return Schedule(p["mask"], p["order"], p["variable"])


register_method(SCHEMA, _factory)
