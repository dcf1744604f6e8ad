"""Calibration: fit a method's coefficients on full-compute runs and store them in its policy.

Full-compute generations run with recording rules attached (the runtime's own hooks, so the
unconditional rows are paired exactly as the guidance methods see them); the fit then reads the
recorded outputs. Calibration seeds are 0..N-1; the benchmarks evaluate on seeds 10_000 and up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import presets
from .adapters import adapter_for, find_denoiser
from .policy import Policy
from .runtime import CallContext, GuidanceRule, RuleSet, StepRule, attach, detach

CALIBRATED = ("linear-ag", "magcache")


class _StepRecorder(StepRule):
    def __init__(self) -> None:
        self.outputs: dict[int, list[torch.Tensor]] = {}

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        return True

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> None:
        return None

    def observe(self, ctx: CallContext, state: dict[str, Any], output: torch.Tensor, rows: Any) -> None:
        self.outputs.setdefault(ctx.step, []).append(output.detach().float().cpu())


class _PairRecorder(GuidanceRule):
    def __init__(self) -> None:
        self.pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        return True

    def estimate(self, ctx: CallContext, state: dict[str, Any], cond: torch.Tensor, pairs: Any) -> None:
        return None

    def observe(
        self, ctx: CallContext, state: dict[str, Any], cond: torch.Tensor, uncond: torch.Tensor, pairs: Any
    ) -> None:
        self.pairs.setdefault(ctx.step, []).append(
            (cond.detach().float().cpu(), uncond.detach().float().cpu())
        )


def record(pipe: Any, run: Callable[[], Any]) -> tuple[_StepRecorder, _PairRecorder]:
    """Run ``run()`` (full-compute generations of ``pipe``) with recorders attached."""
    model = find_denoiser(pipe)
    steps, pairs = _StepRecorder(), _PairRecorder()
    attach(pipe, model, adapter_for(model), RuleSet(step=steps, guidance=pairs), None)
    try:
        run()
    finally:
        detach(model)
    return steps, pairs


def fit_linear_ag(pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> list[float]:
    """Least-squares (a, b, g) per step for u_i = a c_i + b c_(i-1) + g u_(i-1); step 0 gets
    the no-fit default (1, -1, 1), as do steps without recorded pairs."""
    from .methods.guidance.linear_ag import IDENTITY

    n = max(pairs) + 1 if pairs else 0
    coeffs: list[float] = list(IDENTITY)
    for i in range(1, n):
        if i not in pairs or i - 1 not in pairs:
            coeffs += IDENTITY
            continue
        c = torch.cat([p[0].flatten() for p in pairs[i]]).double()
        u = torch.cat([p[1].flatten() for p in pairs[i]]).double()
        c_prev = torch.cat([p[0].flatten() for p in pairs[i - 1]]).double()
        u_prev = torch.cat([p[1].flatten() for p in pairs[i - 1]]).double()
        x = torch.stack([c, c_prev, u_prev], dim=1)
        sol = torch.linalg.lstsq(x, u.unsqueeze(1)).solution.reshape(-1)
        coeffs += [float(v) for v in sol]
    return coeffs


def fit_magcache(outputs: dict[int, list[torch.Tensor]]) -> list[float]:
    from .methods.step.magcache import calibrate as ratios_of

    per_step = [torch.cat(outputs[i]) for i in sorted(outputs)]
    return ratios_of(per_step)


def calibrate(method: str, pipe: Any, run: Callable[[], Any], **overrides: Any) -> Policy:
    """The ``method`` preset with coefficients fitted on the generations ``run()`` makes."""
    if method not in CALIBRATED:
        raise ValueError(f"calibrate: {method!r} has nothing to fit; methods with coefficients: {CALIBRATED}")
    steps, pairs = record(pipe, run)
    if method == "linear-ag":
        if not pairs.pairs:
            raise ValueError(
                "calibrate linear-ag: the runs had no batched classifier-free guidance to record"
            )
        return presets.get(method, coefficients=fit_linear_ag(pairs.pairs), **overrides)
    return presets.get(method, ratios=fit_magcache(steps.outputs), **overrides)
