"""Reference trajectories: what full compute did at every step, recorded once per seed set.

We record, per step, the guided model output the scheduler received, the sample it stepped and
the sample it returned. The planner replays steps from these without running the network, which
needs a first-order (Euler-type) sampler: x_next = x + dt * v. We fit dt per step and refuse
schedulers whose steps do not follow that form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Trajectory:
    """Full-compute record of one batch: ``v[i]`` guided output of step i, ``x[i]`` its input
    sample (``x[N]`` the final sample), ``dt[i]`` the step size, ``t[i]`` its timestep."""

    v: torch.Tensor  # (N, B, ...)
    x: torch.Tensor  # (N + 1, B, ...)
    dt: torch.Tensor  # (N,)
    t: torch.Tensor  # (N,)
    images: np.ndarray  # the pipeline's output images (B, H, W, C)

    @property
    def num_steps(self) -> int:
        return int(self.v.shape[0])


class NotFirstOrderError(ValueError):
    """The pipeline's scheduler does not step as x + dt * v, so the planner cannot replay it."""


@contextlib.contextmanager
def _recording(
    scheduler: Any,
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = scheduler.step

    def step(
        model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        out = original(model_output, timestep, sample, *args, **kwargs)
        prev = out.prev_sample if hasattr(out, "prev_sample") else out[0]
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0]
        records.append(
            (
                model_output.detach().double().cpu(),
                sample.detach().double().cpu(),
                prev.detach().double().cpu(),
                t,
            )
        )
        return out

    scheduler.step = step  # an instance attribute shadows the method; deleted below
    try:
        yield records
    finally:
        del scheduler.step


def record(pipe: Any, generate: Callable[[], np.ndarray]) -> Trajectory:
    """Run ``generate`` (full compute) once and record its trajectory."""
    with _recording(pipe.scheduler) as records:
        images = generate()
    if not records:
        raise ValueError("the pipeline never called scheduler.step; cannot record a trajectory")
    v = torch.stack([r[0] for r in records])
    x = torch.stack([records[0][1], *[r[2] for r in records]])
    delta = x[1:] - x[:-1]
    dims = tuple(range(1, v.dim()))
    dt = (delta * v).sum(dims) / (v * v).sum(dims).clamp_min(1e-30)
    residual = (delta - dt.view(-1, *[1] * (v.dim() - 1)) * v).norm() / delta.norm().clamp_min(1e-30)
    if residual > 1e-4:
        raise NotFirstOrderError(
            f"{type(pipe.scheduler).__name__} does not step as x + dt * v (relative residual "
            f"{float(residual):.1e}); the planner supports first-order (Euler-type) samplers"
        )
    return Trajectory(v=v, x=x, dt=dt, t=torch.stack([r[3] for r in records]), images=images)
