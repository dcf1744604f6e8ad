"""Step rules under other diffusers schedulers on fmnist-dit: multistep solvers (DPM-Solver++,
UniPC) and Heun, whose two evaluations per step are two calls of one step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

import stepcache
from stepcache import zoo
from stepcache.metrics import psnr_per_image

LABELS = list(range(10))


@pytest.fixture(scope="module")
def fmnist():
    pipe = zoo.load("fmnist-dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _schedulers(shift: float) -> dict:
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    return {
        "dpm-solver++": DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow),
        "unipc": UniPCMultistepScheduler(**flow),
        "heun": FlowMatchHeunDiscreteScheduler(shift=shift),
    }


def _fidelity(pipe, steps: int, policy: str) -> tuple[float, float, dict]:
    """Mean PSNR of ``policy`` against this scheduler's own full compute, and its computed
    fraction of the denoiser calls."""

    def run():
        gen = torch.Generator().manual_seed(0)
        return pipe(class_labels=LABELS, num_inference_steps=steps, guidance_scale=3.0, generator=gen).images

    reference = run()
    handle = stepcache.enable(pipe, policy)
    try:
        out = run()
    finally:
        stepcache.disable(pipe)
    stats = handle.stats()
    return float(np.mean(psnr_per_image(out, reference))), stats["computed"] / stats["steps"], stats


def test_multistep_and_heun_keep_a_step_rule_s_fidelity(fmnist) -> None:
    euler = fmnist.scheduler
    shift = float(euler.config.shift)
    euler_psnr, euler_fraction, _ = _fidelity(fmnist, 20, "adams-bashforth")
    assert euler_fraction < 0.6
    try:
        for name, scheduler in _schedulers(shift).items():
            fmnist.scheduler = scheduler
            steps = 10 if name == "heun" else 20  # Heun: 19 evaluations for 10 steps
            psnr, fraction, stats = _fidelity(fmnist, steps, "adams-bashforth")
            assert fraction < 0.7, name  # fewer evaluations than full compute
            assert psnr >= euler_psnr - 3.0, (name, psnr, euler_psnr)
            if name == "heun":  # a step is the scheduler's, not a call: 10 steps of 2 calls (1 last)
                assert stats["steps"] == 19
                assert stats["actions"][-2] == stats["actions"][-3]  # one step, one decision
    finally:
        fmnist.scheduler = euler
