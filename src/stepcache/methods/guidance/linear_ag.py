"""LinearAG (the linear variant of Adaptive Guidance; Castillo et al., 2023). On many steps the
unconditional prediction is an affine function of predictions already at hand: estimate
``u_i = a_i c_i + b_i c_(i-1) + g_i u_(i-1)`` instead of computing it, with per-step coefficients
fitted by least squares on full-compute calibration runs (:func:`stepcache.calibration.calibrate`).

Without fitted coefficients it uses (1, -1, 1): ``u_i = u_(i-1) + (c_i - c_(i-1))``, i.e. the
guidance difference of the previous step carried over. Estimated steps: every ``interval``-th
after ``warmup``, up to the fraction ``end`` of the schedule (the paper: the first half).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, GuidanceRule, RuleSet, put, take
from .. import Method

IDENTITY = (1.0, -1.0, 1.0)


def _check(p: Mapping[str, Any]) -> tuple[str, str] | None:
    coeffs = p["coefficients"]
    if coeffs is not None and len(coeffs) % 3:
        return "coefficients", f"needs 3 numbers per step (a, b, g), got {len(coeffs)}"
    return None


SCHEMA = RuleSchema(
    method="linear-ag",
    level="guidance",
    summary="estimate the unconditional pass as a*c + b*c_prev + g*u_prev (least-squares coefficients)",
    params={
        "interval": Param("int", 2, "estimate every interval-th step after warm-up (others compute)", min=1),
        "warmup": Param("int", 2, "steps that always compute both passes", min=1, max=100_000),
        "end": Param(
            "float", 0.5, "fraction of the schedule after which both passes always run", min=0, max=1
        ),
        "coefficients": Param(
            "float_list",
            None,
            "3 per step (a, b, g), from `stepcache calibrate linear-ag`; null: (1, -1, 1) on every step",
            nullable=True,
        ),
    },
    check=_check,
)


class LinearAG(GuidanceRule):
    def __init__(self, interval: int, warmup: int, end: float, coefficients: list[float] | None):
        self.interval, self.warmup, self.end = interval, warmup, end
        self.coefficients = coefficients

    def _coeffs(self, step: int) -> tuple[float, float, float]:
        c = self.coefficients
        if c is None or 3 * step + 3 > len(c):
            return IDENTITY
        return c[3 * step], c[3 * step + 1], c[3 * step + 2]

    def plan(self, ctx: CallContext, state: dict[str, Any]) -> bool:
        if "u" not in state or ctx.step < self.warmup or state["last"] != ctx.step - 1:
            return True
        if ctx.num_steps and ctx.step >= self.end * ctx.num_steps:
            return True
        return (ctx.step - self.warmup) % self.interval != self.interval - 1

    def estimate(
        self, ctx: CallContext, state: dict[str, Any], cond: torch.Tensor, pairs: torch.Tensor
    ) -> torch.Tensor:
        a, b, g = self._coeffs(ctx.step)
        u = a * cond + b * take(state["c"], pairs) + g * take(state["u"], pairs)
        self._remember(ctx, state, cond, u, pairs)
        return u

    def observe(
        self,
        ctx: CallContext,
        state: dict[str, Any],
        cond: torch.Tensor,
        uncond: torch.Tensor,
        pairs: torch.Tensor,
    ) -> None:
        self._remember(ctx, state, cond, uncond, pairs)

    @staticmethod
    def _remember(
        ctx: CallContext, state: dict[str, Any], cond: torch.Tensor, uncond: torch.Tensor, pairs: torch.Tensor
    ) -> None:
        n = ctx.batch // 2
        state["c"] = put(state.get("c"), pairs, cond, n)
        state["u"] = put(state.get("u"), pairs, uncond, n)
        state["last"] = ctx.step


def fit_coefficients(pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> list[float]:
    """Least-squares (a, b, g) per step for u_i = a c_i + b c_(i-1) + g u_(i-1); step 0 gets
    the no-fit default (1, -1, 1), as do steps without recorded pairs."""
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


def fit(pipe: Any, run: Callable[[], Any], params: Mapping[str, Any]) -> list[float]:
    """The calibration hook: the coefficients fitted on the (c, u) pairs of full-compute runs."""
    from ...calibration import PairRecorder, record

    pairs = PairRecorder()
    record(pipe, run, RuleSet(guidance=pairs))
    if not pairs.pairs:
        raise ValueError("calibrate linear-ag: the runs had no batched classifier-free guidance to record")
    return fit_coefficients(pairs.pairs)


METHOD = Method(
    schema=SCHEMA,
    rule=LinearAG,
    preset="LinearAG: every 2nd step in the first half, the unconditional pass is a fitted affine estimate.",
    sweep=(),
    fits="coefficients",
    calibrate=fit,
)
