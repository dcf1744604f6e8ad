"""Shared piece of the forecasting methods: polynomial extrapolation of past real outputs.

Given outputs o_i at abscissae x_i (step index or timestep), the Lagrange weights
w_i = prod_{j != i} (x - x_j) / (x_i - x_j) give the value at x of the unique polynomial of
degree len(x_i) - 1 through them: exact on polynomial trajectories of that degree. Taylor
expansions built from finite differences (TaylorSeer) and Adams-Bashforth-style linear
combinations (AB-Cache) are this same predictor written in other bases.
"""

from __future__ import annotations

from typing import Any

import torch


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
    weights = lagrange_weights(xs, x)
    acc_dtype = torch.promote_types(outputs[0].dtype, torch.float32)
    result = torch.zeros_like(outputs[0], dtype=acc_dtype)
    for w, o in zip(weights, outputs, strict=True):
        result.add_(o.to(acc_dtype), alpha=w)
    return result.to(outputs[0].dtype)


class History:
    """The last ``size`` real outputs of a branch (whole batch) and where they were taken."""

    def __init__(self, state: dict[str, Any], size: int):
        self.state = state
        self.size = size
        state.setdefault("outputs", [])
        state.setdefault("xs", [])

    def add(self, x: float, output: torch.Tensor) -> None:
        outputs, xs = self.state["outputs"], self.state["xs"]
        outputs.append(output.detach().clone())
        xs.append(float(x))
        del outputs[: -self.size], xs[: -self.size]

    def forecast(self, x: float, order: int) -> torch.Tensor:
        """Extrapolate with up to ``order`` + 1 points (fewer while the history is short)."""
        outputs, xs = self.state["outputs"], self.state["xs"]
        k = min(order + 1, len(outputs))
        return extrapolate(outputs[-k:], xs[-k:], x)
