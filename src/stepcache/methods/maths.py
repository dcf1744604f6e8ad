"""The maths several methods share: interval schedules, relative change, polynomial forecasts.

Forecasts: given outputs o_i at abscissae x_i (step index or timestep), the Lagrange weights
w_i = prod_{j != i} (x - x_j) / (x_i - x_j) give the value at x of the unique polynomial of
degree len(x_i) - 1 through them: exact on polynomial trajectories of that degree. Taylor
expansions built from finite differences (TaylorSeer) and Adams-Bashforth-style linear
combinations (AB-Cache) are this same predictor written in other bases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def on_schedule(step: int, interval: int, warmup: int) -> bool:
    """The fixed schedule of the interval methods: the first ``warmup`` steps, then every
    ``interval``-th."""
    return step < warmup or (step - warmup) % interval == 0


def on_mask(step: int, mask: list[bool]) -> bool:
    """A per-step compute mask's answer; steps past its end compute."""
    return step >= len(mask) or mask[step]


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Per-row mean |now - before| / mean |before|, in float32."""
    now, before = now.float().flatten(1), before.float().flatten(1)
    return (now - before).abs().mean(1) / before.abs().mean(1).clamp_min(1e-12)


def lagrange_weights(xs: list[float], x: float) -> list[float]:
    weights = []
    for i, xi in enumerate(xs):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (x - xj) / (xi - xj)
        weights.append(w)
    return weights


def extrapolate(outputs: list[torch.Tensor], xs: list[float], x: float) -> torch.Tensor:
    """Value at ``x`` of the polynomial through (xs[i], outputs[i]), computed in float32 or wider."""
    return combine(outputs, lagrange_weights(xs, x))


def combine(outputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum(w * o)``, accumulated in float32 or wider, in the outputs' dtype."""
    acc_dtype = torch.promote_types(outputs[0].dtype, torch.float32)
    result = torch.zeros_like(outputs[0], dtype=acc_dtype)
    for w, o in zip(weights, outputs, strict=True):
        result.add_(o.to(acc_dtype), alpha=w)
    return result.to(outputs[0].dtype)


def taylor(outputs: list[torch.Tensor], xs: list[float], x: float) -> torch.Tensor:
    """TaylorSeer's own forecast: factors built by recursive differences, each divided by the
    latest gap (as the paper and diffusers' TaylorSeerCache do), summed with (x - x_last)^k / k!.
    Unlike the polynomial through the points it is not exact on polynomials; it extrapolates
    less far, which can suit features that are not smooth in the step."""
    acc_dtype = torch.promote_types(outputs[0].dtype, torch.float32)
    factors: list[torch.Tensor] = []
    for i, out in enumerate(outputs):
        new = [out.to(acc_dtype)]
        for j in range(min(i, len(outputs) - 1)):
            if j >= len(factors):
                break
            new.append((new[j] - factors[j]) / (xs[i] - xs[i - 1]))
        factors = new
    offset, result = x - xs[-1], torch.zeros_like(factors[0])
    for k, factor in enumerate(factors):
        result.add_(factor, alpha=offset**k / math.factorial(k))
    return result.to(outputs[0].dtype)


def damp(last: torch.Tensor, forecast: torch.Tensor, damping: float) -> torch.Tensor:
    """``damping`` of the way from ``last`` to ``forecast`` (1: the forecast itself; 0: ``last``):
    a shorter step, for extrapolations that overshoot over long gaps or on oscillating features."""
    return forecast if damping == 1.0 else last + damping * (forecast - last)


@dataclass
class History:
    """The last ``size`` real outputs of a branch (whole batch) and where they were taken: the
    typed state of the forecasting rules."""

    size: int
    outputs: list[torch.Tensor] = field(default_factory=list)
    xs: list[float] = field(default_factory=list)

    def add(self, x: float, output: torch.Tensor) -> None:
        self.outputs.append(output.detach().clone())
        self.xs.append(float(x))
        del self.outputs[: -self.size], self.xs[: -self.size]

    def forecast(
        self, x: float, order: int, expansion: str = "polynomial", damping: float = 1.0
    ) -> torch.Tensor:
        """Extrapolate with up to ``order`` + 1 points (fewer while the history is short): the
        polynomial through them, or TaylorSeer's expansion (``expansion="taylor"``), moved
        ``damping`` of the way from the last point."""
        k = min(order + 1, len(self.outputs))
        forecast = taylor if expansion == "taylor" else extrapolate
        return damp(self.outputs[-1], forecast(self.outputs[-k:], self.xs[-k:], x), damping)
