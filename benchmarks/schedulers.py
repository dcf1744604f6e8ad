"""Step rules under other schedulers: fidelity of each step-level preset against the same
scheduler's full compute, and the fraction of denoiser calls it computed, on fmnist-dit.

Schedulers: the shipped flow-matching Euler, DPM-Solver++ (2M) and UniPC on flow sigmas, and
flow-matching Heun (two evaluations per step; 10 steps = 19 calls, the last step first-order).
Writes benchmarks/results/schedulers-fmnist-dit.json.

Run: python benchmarks/schedulers.py [--samples 10] [--policies adams-bashforth,static-interval]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

import stepcache
from stepcache import zoo
from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.metrics import psnr_per_image

ROOT = Path(__file__).resolve().parent.parent


def schedulers(euler) -> dict:
    shift = float(euler.config.shift)
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    return {
        "euler": (euler, 20),
        "dpm-solver++-2m": (
            DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow),
            20,
        ),
        "unipc": (UniPCMultistepScheduler(**flow), 20),
        "heun": (FlowMatchHeunDiscreteScheduler(shift=shift), 10),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10, help="images (labels cycle through the classes)")
    ap.add_argument("--policies", default="static-interval,adams-bashforth,taylorseer,magcache")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "schedulers-fmnist-dit.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = zoo.load("fmnist-dit")
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(args.samples)]
    rows = []
    for name, (scheduler, steps) in schedulers(pipe.scheduler).items():
        pipe.scheduler = scheduler

        def run(n: int = steps) -> np.ndarray:
            gen = torch.Generator().manual_seed(0)
            return pipe(class_labels=labels, num_inference_steps=n, guidance_scale=3.0, generator=gen).images

        reference = run()
        for policy in args.policies.split(","):
            handle = stepcache.enable(pipe, policy)
            try:
                out = run()
            finally:
                stepcache.disable(pipe)
            stats = handle.stats()
            rows.append(
                {
                    "scheduler": name,
                    "steps": steps,
                    "policy": policy,
                    "calls": stats["steps"],
                    "computed_fraction": stats["computed"] / stats["steps"],
                    # per-sample rules compute some rows of a call: count rows too
                    "rows_computed_fraction": sum(r.count("C") for r in stats["row_actions"])
                    / sum(len(r) for r in stats["row_actions"]),
                    "psnr": float(np.mean(psnr_per_image(out, reference))),
                    "actions": "".join(stats["actions"]),
                }
            )
            print(rows[-1], flush=True)
    atomic_write_json(
        args.out,
        {
            "benchmark": "schedulers",
            **environment(ROOT),
            "command": "python " + " ".join(sys.argv),
            "model": "fmnist-dit",
            "samples": args.samples,
            "rows": rows,
        },
    )
    print(args.out)


if __name__ == "__main__":
    main()
