"""Calibration: fit a method's coefficients (or its threshold) on full-compute runs and store
them in its policy.

A method with coefficients declares its fit in its own file (``Method.calibrate``, ``Method.fits``);
the fit runs full-compute generations with one of the recorders below attached (the runtime's own
hooks, so the unconditional rows are paired exactly as the guidance methods see them) and reads
what they recorded. Calibration seeds are 0..N-1; the benchmarks evaluate on seeds 10_000 and up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import presets
from .adapters import adapter_for, find_denoiser
from .methods import methods
from .policy import Policy
from .runtime import BlockRule, CallContext, GuidanceRule, RuleSet, StepRule, attach, detach


class StepRecorder(StepRule):
    def __init__(self) -> None:
        self.outputs: dict[int, list[torch.Tensor]] = {}

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        return True

    def estimate(self, ctx: CallContext, state: dict[str, Any], rows: torch.Tensor | None) -> None:
        return None

    def observe(self, ctx: CallContext, state: dict[str, Any], output: torch.Tensor, rows: Any) -> None:
        self.outputs.setdefault(ctx.step, []).append(output.detach().float().cpu())


class PairRecorder(GuidanceRule):
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


class StackRecorder(BlockRule):
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


def calibrated() -> list[str]:
    """The methods that have coefficients to fit."""
    return [name for name, m in methods().items() if m.calibrate is not None]


def check_calibrate_args(method: Any, run: Any, overrides: dict[str, Any]) -> None:
    """Refuse what would fail only after the recording runs (ValueError naming the argument)."""
    if not isinstance(method, str) or method not in calibrated():
        raise ValueError(
            f"calibrate: {method!r} has nothing to fit; methods with coefficients or a threshold to fit: "
            f"{calibrated()}"
        )
    if not callable(run):
        raise ValueError(f"run: expected a function that generates, got {type(run).__name__}")
    fits = methods()[method].fits
    if fits in overrides:
        raise ValueError(f"{method}.{fits}: is what calibration fits; do not pass it")
    presets.get(method, **overrides)  # PolicyError (a ValueError) naming a bad override


def calibrate(method: str, pipe: Any, run: Callable[[], Any], **overrides: Any) -> Policy:
    """The ``method`` preset with coefficients fitted on the generations ``run()`` makes."""
    check_calibrate_args(method, run, overrides)
    m = methods()[method]
    assert m.calibrate is not None
    params = presets.get(method, **overrides).rules[m.level].params
    return presets.get(method, **{m.fits: m.calibrate(pipe, run, params)}, **overrides)
