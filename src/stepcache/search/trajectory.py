"""Reference trajectories: what full compute did at every step, recorded once per seed set.

We record, per step, the guided model output the scheduler received, the sample it stepped and
the sample it returned. The planner replays steps from these without running the network. An
Euler-type sampler steps as x_next = x + dt * v: we fit dt per step and replay with it. Any other
deterministic scheduler (DPM-Solver++, UniPC, DEIS, DDIM, ...) is replayed through its own
``step``, from a copy of its state taken before each step (the multistep history included); a
scheduler whose replayed step does not give back the recorded sample adds fresh noise (ancestral,
SDE) and is refused, as are schedulers that call the network more than once per step (Heun).
"""

from __future__ import annotations

import contextlib
import copy
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
    # Not Euler-type: the scheduler's state before each step, the timestep it was given, and the
    # dtype it stepped in; ``advance`` replays through them.
    schedulers: list[Any] | None = None
    timesteps: list[Any] | None = None
    dtype: torch.dtype = torch.float32

    @property
    def num_steps(self) -> int:
        return int(self.v.shape[0])

    def start(self, i: int) -> Any:
        """What ``advance`` needs to replay from step i on: a fresh copy of the scheduler's state."""
        return copy.deepcopy(self.schedulers[i]) if self.schedulers is not None else None

    def advance(self, state: Any, s: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The sample after step ``s`` from sample ``x`` with output ``v`` (``state`` from ``start``)."""
        if state is None:
            return x + self.dt[s] * v
        out = state.step(v.to(self.dtype), self.timesteps[s], x.to(self.dtype), return_dict=False)
        return out[0].float()


class NotFirstOrderError(ValueError):
    """The pipeline's scheduler cannot be replayed step by step (noise in its step, or more than
    one network call per step), so the planner cannot score schedules without running them."""


def _snapshot(scheduler: Any) -> Any:
    snap = copy.deepcopy(scheduler)
    snap.__dict__.pop("step", None)  # the recording wrapper, an instance attribute
    return snap


@contextlib.contextmanager
def wrapped_step(scheduler: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """``scheduler.step`` replaced by ``wrap(original)`` inside the block: an instance attribute
    that shadows the method (``_snapshot`` leaves it out of copies), deleted after. The wrapper
    should take the scheduler's own parameter names: pipelines may pass them as keywords."""
    scheduler.step = wrap(scheduler.step)
    try:
        yield
    finally:
        del scheduler.step


def prev_sample(out: Any) -> torch.Tensor:
    """The sample a scheduler's ``step`` returned (as an output object or a tuple)."""
    return out.prev_sample if hasattr(out, "prev_sample") else out[0]


@contextlib.contextmanager
def _recording(scheduler: Any) -> Iterator[list[tuple[Any, ...]]]:
    records: list[tuple[Any, ...]] = []

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def step(
            model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            before = _snapshot(scheduler)
            out = original(model_output, timestep, sample, *args, **kwargs)
            prev = prev_sample(out)
            t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0]
            records.append(
                (
                    model_output.detach().float().cpu(),
                    sample.detach().float().cpu(),
                    prev.detach().float().cpu(),
                    t,
                    before,
                    timestep,
                    model_output.dtype,
                )
            )
            return out

        return step

    with wrapped_step(scheduler, wrap):
        yield records


def record(pipe: Any, generate: Callable[[], np.ndarray]) -> Trajectory:
    """Run ``generate`` (full compute) once and record its trajectory."""
    scheduler = pipe.scheduler
    name = type(scheduler).__name__
    if getattr(scheduler, "order", 1) != 1:
        raise NotFirstOrderError(
            f"{name} calls the network {scheduler.order} times per step; the search replays one "
            "call per step (use Euler, DPM-Solver++, UniPC, DEIS or DDIM)"
        )
    with _recording(scheduler) as records:
        images = generate()
    if not records:
        raise ValueError("the pipeline never called scheduler.step; cannot record a trajectory")
    v = torch.stack([r[0] for r in records])
    x = torch.stack([records[0][1], *[r[2] for r in records]])
    delta = x[1:] - x[:-1]
    dims = tuple(range(1, v.dim()))
    dt = (delta * v).sum(dims) / (v * v).sum(dims).clamp_min(1e-30)
    residual = (delta - dt.view(-1, *[1] * (v.dim() - 1)) * v).norm() / delta.norm().clamp_min(1e-30)
    t = torch.stack([r[3] for r in records])
    if residual <= 1e-4:
        return Trajectory(v=v, x=x, dt=dt, t=t, images=images)
    traj = Trajectory(
        v=v,
        x=x,
        dt=dt,
        t=t,
        images=images,
        schedulers=[r[4] for r in records],
        timesteps=[r[5] for r in records],
        dtype=records[0][6],
    )
    for s in range(traj.num_steps):  # the replay must give back what the run did
        again = traj.advance(traj.start(s), s, x[s], v[s])
        err = (again - x[s + 1]).norm() / x[s + 1].norm().clamp_min(1e-30)
        if not err <= 1e-3:
            raise NotFirstOrderError(
                f"{name} does not step deterministically (replaying step {s} with the recorded output "
                f"misses the recorded sample by {float(err):.1e}): it adds fresh noise per step "
                "(ancestral or SDE), which the search cannot replay; use a deterministic scheduler "
                "(Euler, DPM-Solver++, UniPC, DEIS, DDIM)"
            )
    return traj
