"""Bottleneck sampling (Tian et al., 2025, "Training-free Diffusion Acceleration with Bottleneck
Sampling"; ../shared/METHODS.md: up to 3x on images). The first steps fix the layout and the last
ones the detail, both at full resolution; the steps between need far fewer pixels, so the network
answers them at a lower resolution.

The paper moves the latent itself to low resolution and re-noises it when going back up. A hook
cannot resize the pipeline's latent, so here the latent stays at full size: on the middle steps
the network runs on the sample resized by ``scale`` and its output is resized back; with
``detail`` the high frequencies it cannot see come from the last full-resolution output (what the
re-noising stands in for in the paper: detail the low stage did not make). Models that cannot take
another size (packed tokens, fixed position tables) are refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, StepRule, put, take
from ...runtime.engine import resize
from .. import Method

SCHEMA = RuleSchema(
    method="bottleneck",
    level="step",
    summary="run the middle steps at a lower resolution; the first and last at full resolution",
    params={
        "scale": Param(
            "float", 0.5, "height and width of the low-resolution steps, relative", min=0.05, max=0.95
        ),
        "start": Param(
            "float", 0.3, "fraction of the steps before the low-resolution stage", min=0.0, max=1.0
        ),
        "end": Param(
            "float", 0.8, "fraction of the steps after which full resolution resumes", min=0.0, max=1.0
        ),
        "detail": Param(
            "bool", True, "add the high frequencies of the last full-resolution output to the low stage's"
        ),
    },
    check=lambda p: ("end", "must be greater than start") if p["end"] <= p["start"] else None,
)


@dataclass
class LastFull:
    """The last full-resolution output, per row."""

    out: torch.Tensor | None = None


class Bottleneck(StepRule):
    def __init__(self, scale: float, start: float, end: float, detail: bool):
        self.scale, self.start, self.end, self.detail = scale, start, end, detail

    def new_state(self) -> LastFull:
        return LastFull()

    def plan(self, ctx: CallContext, state: LastFull) -> bool:
        if ctx.num_steps is None or state.out is None:
            return True  # without the schedule's length there is no middle to find
        return not self.start * ctx.num_steps <= ctx.step < self.end * ctx.num_steps

    def estimate(self, ctx: CallContext, state: LastFull, rows: torch.Tensor | None) -> torch.Tensor:
        assert state.out is not None  # plan computes until a full-resolution output is observed
        low = ctx.run_at(self.scale, rows)
        last = take(state.out, rows)
        out = resize(low, tuple(last.shape[-2:]))
        if self.detail:  # the part of the last full output that the low resolution cannot hold
            out = out + last - resize(resize(last, tuple(low.shape[-2:])), tuple(last.shape[-2:]))
        return out

    def observe(
        self, ctx: CallContext, state: LastFull, output: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        state.out = put(state.out, rows, output, ctx.batch)


METHOD = Method(
    schema=SCHEMA,
    rule=Bottleneck,
    preset="Bottleneck sampling: steps 30-80% of the schedule at half height and width, detail carried over.",
    sweep=({}, {"scale": 0.75}, {"detail": False}),
)
