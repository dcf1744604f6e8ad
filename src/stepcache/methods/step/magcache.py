"""MagCache (Ma et al., 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache").
The ratio of output magnitudes between successive steps follows a smooth curve: skip a step
while the error accumulated from that ratio stays small, and answer it with the last output
scaled by the accumulated ratio.

We work on the denoiser output (the paper: the block stack's residual). The ratio curve is either
calibrated (``ratios``, one per step, e.g. from :func:`calibrate`) or, by default, estimated
online per sample from its last two computed steps. Decided per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, RuleSet, StepRule, put, take
from .. import Method

SCHEMA = RuleSchema(
    method="magcache",
    level="step",
    summary="skip while the accumulated magnitude-ratio error stays under a threshold; reuse scaled",
    params={
        "threshold": Param(
            "float", 0.06, "budget for the accumulated error sum |1 - ratio product|", min=0.0, max=10.0
        ),
        "max_consecutive": Param("int", 2, "cap on consecutive skipped steps per sample (paper's K)", min=0),
        "warmup": Param("int", 3, "steps always computed at the start", min=0, max=100_000),
        "ratios": Param(
            "float_list",
            None,
            "calibrated ratio |o_i| / |o_(i-1)| per step (null: estimate online per sample)",
            min=0.0,
            nullable=True,
        ),
    },
)


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).norm(dim=1).clamp_min(1e-12)


class MagCache(StepRule):
    def __init__(self, threshold: float, max_consecutive: int, warmup: int, ratios: list[float] | None):
        self.threshold, self.max_consecutive, self.warmup = threshold, max_consecutive, warmup
        self.ratios = ratios

    def _ratio(self, ctx: CallContext, state: dict[str, Any]) -> torch.Tensor:
        if self.ratios is not None and ctx.step < len(self.ratios):
            return torch.full_like(state["rate"], self.ratios[ctx.step])
        return state["rate"]

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool | torch.Tensor:
        if ctx.step < self.warmup or "rate" not in state or self.max_consecutive == 0:
            return True
        gain = state["gain"] * self._ratio(ctx, state)
        error = state["error"] + (1 - gain).abs()
        run = (error >= self.threshold) | (state["skips"] >= self.max_consecutive) | ~state["ready"]
        # Skipped rows carry the accumulation forward; computed rows are reset in observe.
        state["gain"] = torch.where(run, state["gain"], gain)
        state["error"] = torch.where(run, state["error"], error)
        state["skips"] = torch.where(run, state["skips"], state["skips"] + 1)
        return run

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> torch.Tensor:
        scale = take(state["gain"], rows).to(state["out"].dtype)
        return take(state["out"], rows) * scale.view(-1, *([1] * (state["out"].dim() - 1)))

    def observe(
        self, ctx: CallContext, state: dict[str, Any], output: torch.Tensor, rows: torch.Tensor | None
    ) -> None:
        n, dev = ctx.batch, output.device
        if "rate" not in state:
            state["rate"] = torch.ones(n, device=dev)
            state["ready"] = torch.zeros(n, dtype=torch.bool, device=dev)
            state["step"] = torch.zeros(n, device=dev)
            state["norm"] = torch.zeros(n, device=dev)
        norm, step = _norms(output), torch.full((output.shape[0],), float(ctx.step), device=dev)
        had = take(state["norm"], rows) > 0
        gap = (step - take(state["step"], rows)).clamp_min(1)
        rate = (norm / take(state["norm"], rows).clamp_min(1e-12)) ** (1 / gap)
        state["rate"] = put(state["rate"], rows, torch.where(had, rate, take(state["rate"], rows)), n)
        state["ready"] = put(state["ready"], rows, had, n)
        state["norm"] = put(state["norm"], rows, norm, n)
        state["step"] = put(state["step"], rows, step, n)
        state["out"] = put(state.get("out"), rows, output, n)
        state["gain"] = put(state.get("gain"), rows, torch.ones_like(norm), n)
        state["error"] = put(state.get("error"), rows, torch.zeros_like(norm), n)
        state["skips"] = put(state.get("skips"), rows, torch.zeros_like(norm), n)


def calibrate(outputs: list[torch.Tensor]) -> list[float]:
    """Per-step ratios from one full-compute run's outputs (one tensor per step): step 0 gets 1."""
    ratios = [1.0]
    for before, now in zip(outputs, outputs[1:], strict=False):
        ratios.append(float((_norms(now) / _norms(before)).mean()))
    return ratios


def fit(pipe: Any, run: Callable[[], Any], params: Mapping[str, Any]) -> list[float]:
    """The calibration hook: per-step ratios from the outputs of full-compute runs, pooled."""
    from ...calibration import StepRecorder, record

    steps = StepRecorder()
    record(pipe, run, RuleSet(step=steps))
    return calibrate([torch.cat(steps.outputs[i]) for i in sorted(steps.outputs)])


METHOD = Method(
    schema=SCHEMA,
    rule=MagCache,
    preset=(
        "MagCache: skip while the accumulated output-magnitude-ratio error stays under 0.06; reuse scaled."
    ),
    sweep=(
        {},
        {"threshold": 0.3, "max_consecutive": 3},
    ),
    fits="ratios",
    calibrate=fit,
)
