"""The schedule rule's ``damping`` at fixed masks: the searched band policies of
benchmarks/results/search-stride-MODEL, their forecast re-run with order 1 and 2 and damping
0.5 / 0.75 / 1 / 1.25, PSNR vs full compute on the 16 held-out seeds (10_000..), same FLOPs.

Writes benchmarks/results/damping-MODEL.json.
Run: python benchmarks/damping.py --model fmnist-dit [--bands 1.5,2,3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import stepcache
from stepcache import metrics, zoo
from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.policy import Policy

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="fmnist-dit")
    ap.add_argument("--bands", default="1.5,2,3")
    args = ap.parse_args()
    pipe = zoo.load(args.model)
    text = zoo.spec(args.model).conditioning == "text"
    if text:
        from stepcache.zoo.text import DEMO_PROMPTS

        labels = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(16)]
    else:
        labels = [i % 10 for i in range(16)]

    def generate():
        gens = [torch.Generator().manual_seed(10_000 + i) for i in range(16)]
        cond = {"prompt": labels} if text else {"class_labels": labels}
        steps, guidance = pipe.default_steps, pipe.default_guidance
        return pipe(**cond, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images

    reference = generate()
    searched = json.loads((ROOT / f"benchmarks/results/search-stride-{args.model}/result.json").read_text())
    rows = []
    for band in args.bands.split(","):
        source = next(r["params"] for r in searched["runs"] if r["name"].endswith(f"speedup{band}"))
        step = source["rules"]["step"]
        for order in (1, 2):
            for damping in (0.5, 0.75, 1.0, 1.25):
                rule = {**step, "order": order, "damping": damping, "expansion": "polynomial"}
                policy = Policy.from_dict({**source, "rules": {**source["rules"], "step": rule}})
                stepcache.enable(pipe, policy)
                try:
                    psnr = float(metrics.psnr_per_image(generate(), reference).mean())
                finally:
                    stepcache.disable(pipe)
                rows.append(
                    {
                        "band": band,
                        "searched_order": step["order"],
                        "order": order,
                        "damping": damping,
                        "psnr": psnr,
                    }
                )
                print(rows[-1], flush=True)
    atomic_write_json(
        ROOT / "benchmarks" / "results" / f"damping-{args.model}.json",
        {
            "benchmark": "damping",
            "model": args.model,
            **environment(ROOT),
            "command": "python " + " ".join(sys.argv),
            "protocol": {
                "seeds": [10_000, 10_015],
                "masks": "search-stride band policies",
                "presets": "schedule",
            },
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
