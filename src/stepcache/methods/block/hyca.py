"""HyCa, hybrid feature caching (Zheng et al., 2025, "Let Features Decide Their Own Solvers:
Hybrid Feature Caching for Diffusion Transformers"; ../shared/METHODS.md: FLUX 5.55x). The
feature dimensions of a DiT do not all move alike (some drift smoothly, some bend, some
oscillate), so each dimension gets the solver that forecasts it best instead of one for all.

The middle blocks run on TaylorSeer-feature's schedule (``interval`` after ``warmup``, or a
``mask``); on the other steps each channel (last dimension) of the middle's residual is forecast
by its own solver from the pool below. The paper clusters dimensions offline and picks a solver per
cluster; here each channel is its own cluster, and channels sharing a solver are forecast together,
so a skipped step costs one forecast. The assignment ``solvers`` is fitted offline by ``stepcache
calibrate hyca`` (the forecast error of each solver on full-compute runs under this schedule), or,
when null, chosen online: every computed step first scores each solver's forecast of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...policy import Param, RuleSchema
from ...runtime import CallContext, RuleSet
from ...runtime.interfaces import Streams
from .. import Method
from ..maths import History, damp, extrapolate, taylor
from .taylorseer_feature import SCHEMA as FEATURE_SCHEMA
from .taylorseer_feature import TaylorSeerFeature


def _reuse(outs: list[torch.Tensor], xs: list[float], x: float) -> torch.Tensor:
    return outs[-1]


def _linear(outs: list[torch.Tensor], xs: list[float], x: float) -> torch.Tensor:
    return extrapolate(outs[-2:], xs[-2:], x)


def _quadratic(outs: list[torch.Tensor], xs: list[float], x: float) -> torch.Tensor:
    return extrapolate(outs[-3:], xs[-3:], x)


def _taylor(outs: list[torch.Tensor], xs: list[float], x: float) -> torch.Tensor:
    return taylor(outs[-3:], xs[-3:], x)


def _damped(outs: list[torch.Tensor], xs: list[float], x: float) -> torch.Tensor:
    # Half the linear step: for dimensions that oscillate, where a full step overshoots.
    return damp(outs[-1], extrapolate(outs[-2:], xs[-2:], x), 0.5)


# The pool, by id: reuse (0th order), the lines and parabolas through the last computed points
# (Adams-Bashforth-type extrapolation in the value's basis), TaylorSeer's expansion, a damped step.
SOLVERS: dict[str, Callable[[list[torch.Tensor], list[float], float], torch.Tensor]] = {
    "reuse": _reuse,
    "linear": _linear,
    "quadratic": _quadratic,
    "taylor": _taylor,
    "damped": _damped,
}
POOL = tuple(SOLVERS.values())

SCHEMA = RuleSchema(
    method="hyca",
    level="block",
    summary="forecast the middle blocks' residual between computed steps, each channel by its own solver",
    params={
        **{k: FEATURE_SCHEMA.params[k] for k in ("interval", "warmup", "fn", "bn", "mask")},
        "solvers": Param(
            "int_list",
            None,
            "per channel of the middle's residual (streams in order), the solver: "
            + ", ".join(f"{i} {name}" for i, name in enumerate(SOLVERS))
            + " (null: chosen online from the computed steps)",
            min=0,
            max=len(SOLVERS) - 1,
            nullable=True,
        ),
    },
)


@dataclass
class HybridState:
    """Per hidden stream of the middle span: its residual history, each solver's summed squared
    error per channel (online choice) and the channel groups per solver (None: stream absent)."""

    streams: list[History | None] | None = None
    errors: list[torch.Tensor | None] = field(default_factory=list)
    groups: list[list[tuple[int, torch.Tensor]] | None] = field(default_factory=list)


def forecast(history: History, x: float, groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The value of ``history`` at ``x``, each group of channels by its solver."""
    if len(groups) == 1:
        return POOL[groups[0][0]](history.outputs, history.xs, x)
    out = torch.empty_like(history.outputs[-1])
    for solver, channels in groups:
        part = [o.index_select(-1, channels) for o in history.outputs]
        out.index_copy_(-1, channels, POOL[solver](part, history.xs, x))
    return out


def forecast_each(history: History, x: float, choice: torch.Tensor) -> torch.Tensor:
    """The value of ``history`` at ``x``, channel c by solver choice[c]: every solver forecasts and
    each channel takes its own (no host sync, for a choice that changes every step)."""
    preds = torch.stack([solve(history.outputs, history.xs, x) for solve in POOL])
    index = choice.view(1, *[1] * (preds.dim() - 2), -1).expand(1, *preds.shape[1:])
    return preds.gather(0, index).squeeze(0)


def channel_errors(history: History, x: float, actual: torch.Tensor) -> torch.Tensor:
    """(solvers, channels): each solver's squared error forecasting ``actual`` at ``x``, summed
    over every other dimension."""
    dims = tuple(range(actual.dim() - 1))
    return torch.stack(
        [
            (solve(history.outputs, history.xs, x).float() - actual.float()).square().sum(dims)
            for solve in POOL
        ]
    )


def group(assignment: list[int], device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """Channels by solver id: [(solver, channel indices)], solvers with no channel left out."""
    ids = torch.tensor(assignment)
    return [(s, (ids == s).nonzero().flatten().to(device)) for s in sorted(set(assignment))]


class HyCa(TaylorSeerFeature):
    def __init__(
        self,
        interval: int,
        warmup: int,
        fn: int,
        bn: int,
        mask: list[bool] | None,
        solvers: list[int] | None,
    ):
        super().__init__(interval, 2, warmup, fn, bn, mask)
        self.solvers = solvers

    def new_state(self) -> HybridState:
        return HybridState()

    def estimate(self, ctx: CallContext, state: HybridState, rows: torch.Tensor | None) -> Streams:
        assert state.streams is not None  # plan computes until the first residual is observed
        out = []
        for history, errors, groups in zip(state.streams, state.errors, state.groups, strict=True):
            if history is None:
                out.append(None)
                continue
            if groups is not None:
                value = forecast(history, float(ctx.step), groups)
            else:
                value = forecast_each(history, float(ctx.step), errors.argmin(0))
            out.append(value if rows is None else value.index_select(0, rows))
        return tuple(out)

    def observe(
        self, ctx: CallContext, state: HybridState, residual: Streams, rows: torch.Tensor | None
    ) -> None:
        if rows is not None:  # a fixed schedule decides for the whole batch
            return
        if state.streams is None:
            state.streams = [None if r is None else History(3) for r in residual]
            state.errors = [None] * len(residual)
            state.groups = [None] * len(residual)
            if self.solvers is not None:
                state.groups = [None if r is None else group(a, r.device) for r, a in self._split(residual)]
            else:  # scores to choose from online
                state.errors = [
                    None if r is None else r.new_zeros(len(POOL), r.shape[-1], dtype=torch.float32)
                    for r in residual
                ]
        for i, (history, r) in enumerate(zip(state.streams, residual, strict=True)):
            if history is None or r is None:
                continue
            if state.errors[i] is not None and history.outputs:
                state.errors[i] += channel_errors(history, float(ctx.step), r)
            history.add(float(ctx.step), r)

    def _split(self, residual: Streams) -> list[tuple[torch.Tensor | None, list[int]]]:
        """Each stream with its piece of the calibrated assignment."""
        assert self.solvers is not None
        widths = [0 if r is None else r.shape[-1] for r in residual]
        if sum(widths) != len(self.solvers):
            raise ValueError(
                f"hyca.solvers has {len(self.solvers)} entries but the middle blocks' residual has "
                f"{sum(widths)} channels ({' + '.join(str(w) for w in widths if w)}): it was fitted on "
                "another model or span; run `stepcache calibrate hyca` on this one"
            )
        starts = [sum(widths[:i]) for i in range(len(widths))]
        return [(r, self.solvers[a : a + w]) for r, a, w in zip(residual, starts, widths, strict=True)]


class SpanRecorder(TaylorSeerFeature):
    """Computes every step and records the middle span's residual, per stream, by (branch, step)."""

    def __init__(self, fn: int, bn: int) -> None:
        super().__init__(1, 0, 0, fn, bn)
        self.residuals: dict[tuple[int, int], list[Streams]] = {}

    def plan(self, ctx: CallContext, state: Any, head_residual: Streams) -> bool:
        return True

    def observe(self, ctx: CallContext, state: Any, residual: Streams, rows: torch.Tensor | None) -> None:
        kept = tuple(None if r is None else r.detach().float().cpu() for r in residual)
        self.residuals.setdefault((ctx.branch, ctx.step), []).append(kept)


def fit_solvers(
    residuals: Mapping[tuple[int, int], list[Streams]], computes: Callable[[int], bool]
) -> list[int]:
    """Per channel (streams in order), the solver with the least squared error over the steps the
    schedule skips, each forecast from the computed steps before it on full-compute trajectories.
    ``residuals``: by (branch, step), each call's streams (a SpanRecorder's record)."""
    errors: torch.Tensor | None = None
    for branch in sorted({b for b, _ in residuals}):
        histories: list[History | None] | None = None
        for step in sorted(s for b, s in residuals if b == branch):
            calls = residuals[(branch, step)]
            streams = [None if c[0] is None else torch.cat(c) for c in zip(*calls, strict=True)]
            if histories is not None and not computes(step):
                pairs = zip(histories, streams, strict=True)
                err = torch.cat(
                    [channel_errors(h, float(step), r) for h, r in pairs if h is not None and r is not None],
                    1,
                )
                errors = err if errors is None else errors + err
            else:
                histories = histories or [None if r is None else History(3) for r in streams]
                for h, r in zip(histories, streams, strict=True):
                    if h is not None and r is not None:
                        h.add(float(step), r)
    if errors is None:
        raise ValueError("calibrate hyca: the schedule skips none of the recorded steps; nothing to fit")
    return [int(s) for s in errors.argmin(0)]


def fit(pipe: Any, run: Callable[[], Any], params: Mapping[str, Any]) -> list[int]:
    """The calibration hook: record the middle span under full compute, score every solver per
    channel on the steps this rule's schedule skips."""
    from ...calibration import record

    recorder = SpanRecorder(params["fn"], params["bn"])
    record(pipe, run, RuleSet(block=recorder))
    schedule = TaylorSeerFeature(params["interval"], 0, params["warmup"], 0, 0, params["mask"])
    return fit_solvers(recorder.residuals, lambda step: schedule.computes(step))


METHOD = Method(
    schema=SCHEMA,
    rule=HyCa,
    preset=(
        "HyCa: the middle blocks every 3rd step; between, each channel forecast by its own solver, "
        "chosen from the computed steps."
    ),
    sweep=({}, {"interval": 2}),
    fits="solvers",
    calibrate=fit,
)
