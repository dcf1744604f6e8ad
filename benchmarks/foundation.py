"""Foundation benchmark on digits-dit: full-compute quality, and each preset vs full compute.

Writes benchmarks/results/foundation-digits-dit.json (device, command, commit, numbers).
Run: python benchmarks/foundation.py [--samples 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from stepcache import presets, zoo
from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.demo import run_demo
from stepcache.zoo.classifier import classifier_for

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [
    ("static-interval", {"interval": 2, "warmup": 1}),
    ("static-interval", {"interval": 3, "warmup": 1}),
    ("fbcache", {}),
    ("fbcache", {"threshold": 0.3, "max_consecutive": 2}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=500, help="images for class accuracy")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per demo run")
    default_out = Path(__file__).parent / "results" / "foundation-digits-dit.json"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()

    pipe = zoo.load("digits-dit")
    clf = classifier_for("digits-dit")
    real_acc = clf.info["test_accuracy"]
    labels = [i % 10 for i in range(args.samples)]
    quality = {"real_heldout_accuracy": real_acc, "samples": args.samples, "steps": pipe.default_steps}
    for g in (1.0, pipe.default_guidance):
        images = pipe(
            class_labels=labels,
            num_inference_steps=pipe.default_steps,
            guidance_scale=g,
            generator=torch.Generator().manual_seed(123),
        ).images
        quality[f"class_accuracy_guidance_{g:g}"] = clf.accuracy(images, labels)

    runs = []
    for name, params in SETTINGS:
        policy = presets.get(name, **params)
        with tempfile.TemporaryDirectory() as tmp:
            r = run_demo(policy=policy, repeats=args.repeats, out_dir=tmp)
        runs.append(
            {
                "preset": name,
                "params": params,
                "computed": r["computed"],
                "partial": r["partial"],
                "estimated": r["estimated"],
                "speedup": round(r["speedup"], 3),
                "psnr_db": r["psnr_db_mean"],
                "latency_ms": {
                    k: round(v * 1000, 2) for k, v in r["latency_s"].items() if k.endswith("median")
                },
            }
        )
        print(runs[-1], flush=True)
    result = {
        "benchmark": "foundation",
        "model": "digits-dit",
        **environment(ROOT),
        "command": "python " + " ".join(sys.argv),
        "demo_protocol": "16 samples (labels 0-9), 20 steps, guidance 2, warm-up excluded, median of repeats",
        "quality": quality,
        "runs": runs,
    }
    atomic_write_json(args.out, result)
    print(args.out)


if __name__ == "__main__":
    main()
