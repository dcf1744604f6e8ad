"""Pipelines as a user would hand them to ``stepcache search/bench MODULE:FUNCTION``.

``fmnist_dit_dpmpp``: the shipped fmnist-dit with DPM-Solver++ (2M) on its flow sigmas in place
of its Euler scheduler, i.e. a pipeline the zoo does not ship. Run from the repository root:
``stepcache search benchmarks.factories:fmnist_dit_dpmpp --workload benchmarks/workloads/fmnist-dpmpp.json``.
"""

from __future__ import annotations

from typing import Any


def fmnist_dit_dpmpp() -> Any:
    from diffusers import DPMSolverMultistepScheduler

    from stepcache import zoo

    pipe = zoo.load("fmnist-dit")
    flow = {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "flow_shift": float(pipe.scheduler.config.shift),
    }
    pipe.scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow)
    return pipe
