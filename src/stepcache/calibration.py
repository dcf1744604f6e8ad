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
from .runtime import BlockRule, CallContext, GuidanceRule, RuleSet, StepRule, attach, detach

CALIBRATED = ("linear-ag", "magcache", "teacache")


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


class _StackRecorder(BlockRule):
    """Per call: the first block's modulated input and the whole stack's residual (stream 0)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, torch.Tensor]] = []  # (branch, step, modulated)
        self.residuals: list[torch.Tensor] = []

    def span(self, num_blocks: int) -> tuple[int, int]:
        return 0, num_blocks

    def plan(self, ctx: CallContext, state: dict[str, Any], head_residual: Any) -> bool:
        self.calls.append((ctx.branch, ctx.step, head_residual[0].detach().float().cpu()))
        return True

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: Any) -> Any:
        raise AssertionError("the recorder always computes")

    def observe(self, ctx: CallContext, state: dict[str, Any], residual: Any, rows: Any) -> None:
        self.residuals.append(residual[0].detach().float().cpu())


def record(pipe: Any, run: Callable[[], Any], recorders: RuleSet) -> None:
    """Run ``run()`` (full-compute generations of ``pipe``) with the recording rules attached."""
    model = find_denoiser(pipe)
    attach(pipe, model, adapter_for(model), recorders, None)
    try:
        run()
    finally:
        detach(model)


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


def fit_teacache(stack: _StackRecorder, degree: int = 4) -> list[float]:
    """Polynomial (highest degree first) from the modulated input's relative-L1 change between
    consecutive steps to the stack residual's, pooled over samples."""
    import numpy as np

    from .methods.block.fbcache import relative_l1

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


FITTED = {"linear-ag": "coefficients", "magcache": "ratios", "teacache": "coefficients"}


def check_calibrate_args(method: Any, run: Any, overrides: dict[str, Any]) -> None:
    """Refuse what would fail only after the recording runs (ValueError naming the argument)."""
    if not isinstance(method, str) or method not in CALIBRATED:
        raise ValueError(f"calibrate: {method!r} has nothing to fit; methods with coefficients: {CALIBRATED}")
    if not callable(run):
        raise ValueError(f"run: expected a function that generates, got {type(run).__name__}")
    if FITTED[method] in overrides:
        raise ValueError(f"{method}.{FITTED[method]}: is what calibration fits; do not pass it")
    presets.get(method, **overrides)  # PolicyError (a ValueError) naming a bad override


def calibrate(method: str, pipe: Any, run: Callable[[], Any], **overrides: Any) -> Policy:
    """The ``method`` preset with coefficients fitted on the generations ``run()`` makes."""
    check_calibrate_args(method, run, overrides)
    # Each method records only what its fit reads.
    if method == "teacache":
        stack = _StackRecorder()
        record(pipe, run, RuleSet(block=stack))
        return presets.get(method, coefficients=fit_teacache(stack), **overrides)
    if method == "linear-ag":
        pairs = _PairRecorder()
        record(pipe, run, RuleSet(guidance=pairs))
        if not pairs.pairs:
            raise ValueError(
                "calibrate linear-ag: the runs had no batched classifier-free guidance to record"
            )
        return presets.get(method, coefficients=fit_linear_ag(pairs.pairs), **overrides)
    steps = _StepRecorder()
    record(pipe, run, RuleSet(step=steps))
    return presets.get(method, ratios=fit_magcache(steps.outputs), **overrides)
