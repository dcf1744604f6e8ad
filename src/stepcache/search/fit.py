"""Fitted forecasts: per skipped step, the weights of the last computed outputs that keep the
sample on the full-compute trajectory.

A planned schedule extrapolates a skipped step's output from the last ``order`` + 1 computed
ones; the polynomial's weights are fixed by the timesteps alone. Here they are fitted, in closed
loop, on the calibration seeds: one generation runs the schedule, and at each skipped step the
``order`` + 1 weights are the least-squares solution that brings the sample after the step
nearest the reference sample at that point. The sample the step starts from is the accelerated
run's own, so the fit corrects the drift of the steps before it, not just the forecast of this
one. The sampler's step is affine in the model output, so a few trial steps on a copy of the
live scheduler give the least-squares problem exactly, whatever the scheduler.

Gradient-free: ``order`` + 1 numbers per skipped step, from one calibration generation that the
search would have run anyway to score the schedule. They are stored in the policy
(``schedule``'s ``weights``) and held-out seeds are scored with them fixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .trajectory import _snapshot, prev_sample, wrapped_step


class TrajectoryFit:
    """Fits a schedule's skipped-step weights during one generation of its pipeline.

    ``samples[s]`` is the reference sample before step ``s`` (``samples[N]`` the final one), as
    ``Trajectory.x`` records it; ``mask`` the schedule's computed steps."""

    def __init__(self, scheduler: Any, samples: torch.Tensor, mask: list[bool]):
        self.scheduler, self.samples, self.mask = scheduler, samples, list(mask)
        self.outputs: dict[int, torch.Tensor] = {}  # step -> the model output the scheduler got
        self.sample: torch.Tensor | None = None  # the sample the next step starts from
        self.step_index = 0
        self.fitted: dict[int, list[float]] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[TrajectoryFit]:
        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            def step(
                model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *rest: Any, **kw: Any
            ) -> Any:
                out = original(model_output, timestep, sample, *rest, **kw)
                self.outputs[self.step_index] = model_output.detach()
                self.sample = prev_sample(out)
                self.step_index += 1
                return out

            return step

        with wrapped_step(self.scheduler, wrap):
            yield self

    def __call__(self, step: int, k: int) -> list[float]:
        """The weights of the last ``k`` computed outputs (oldest first) for skipped ``step``."""
        if step in self.fitted:  # a second call of the same step (separate CFG passes)
            return self.fitted[step]
        if step != self.step_index or self.sample is None:
            raise RuntimeError(
                f"fitting: the pipeline is at step {self.step_index} of its scheduler, the schedule "
                f"at step {step}; the fit needs one scheduler step per denoising step"
            )
        before = [s for s in range(step) if self.mask[s]][-k:]
        history = [self.outputs[s] for s in before]
        x = self.sample
        timestep = self.scheduler.timesteps[step]

        def advance(v: torch.Tensor) -> torch.Tensor:
            return prev_sample(_snapshot(self.scheduler).step(v, timestep, x)).double().flatten()

        start = advance(torch.zeros_like(history[0]))
        columns = torch.stack([advance(h) - start for h in history], 1)
        target = self.samples[step + 1].to(start.device, torch.float64).flatten() - start
        weights = torch.linalg.lstsq(columns.cpu(), target.cpu().unsqueeze(1)).solution.squeeze(1)
        self.fitted[step] = [float(w) for w in weights]
        return self.fitted[step]


def fitted_weights(fit: TrajectoryFit, num_steps: int, k: int) -> list[float]:
    """The ``schedule`` method's flat ``weights``: ``k`` per step, zeros where nothing was fitted."""
    out = [0.0] * (num_steps * k)
    for step, weights in fit.fitted.items():
        out[step * k : (step + 1) * k] = weights
    return out
