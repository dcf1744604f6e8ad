"""Quality of the zoo's full-compute models: class accuracy, FD-domain and KID with their floors.

For each model, generates N samples (labels balanced over the classes) at its default steps and
guidance, and compares them with the test set in the shipped domain classifier's feature space.
The floor is the same metric between two disjoint halves of the real test set.
Writes benchmarks/results/zoo-quality.json and docs/zoo/KEY.png (a sample grid per model).

Run: python benchmarks/zoo_quality.py [--models fmnist-dit,fmnist-unet] [--samples 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stepcache import zoo
from stepcache._env import environment
from stepcache._io import atomic_write_bytes, atomic_write_json
from stepcache.demo import grid_png
from stepcache.metrics import frechet_distance, kernel_distance
from stepcache.zoo.classifier import classifier_for
from stepcache.zoo.data import load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


def generate(pipe, labels: list[int], batch: int, seed: int) -> np.ndarray:
    out = []
    for i in range(0, len(labels), batch):
        gen = torch.Generator().manual_seed(seed + i)
        out.append(
            pipe(
                class_labels=labels[i : i + batch],
                num_inference_steps=pipe.default_steps,
                guidance_scale=pipe.default_guidance,
                generator=gen,
            ).images
        )
    return np.concatenate(out)


def evaluate(key: str, samples: int, batch: int) -> dict:
    pipe = zoo.load(key)
    clf = classifier_for(key)
    labels = [i % 10 for i in range(samples)]
    t0 = time.perf_counter()
    images = generate(pipe, labels, batch, seed=1000)
    seconds = time.perf_counter() - t0
    row: dict = {
        "model": key,
        "samples": samples,
        "steps": pipe.default_steps,
        "guidance": pipe.default_guidance,
        "class_accuracy": clf.accuracy(images, labels),
        "generation_seconds": round(seconds, 1),
        "classifier_test_accuracy": clf.info["test_accuracy"],
    }
    if clf.feature_net is not None:
        real, _ = load_fashion_mnist("test")
        real_images = ((real + 1) / 2).permute(0, 2, 3, 1).numpy()
        real_feats = clf.features(real_images)
        fake_feats = clf.features(images)
        half = len(real_feats) // 2
        n = min(samples, half)
        row["fd_domain"] = frechet_distance(real_feats[:n], fake_feats[:n])
        row["fd_domain_floor"] = frechet_distance(real_feats[:n], real_feats[half : half + n])
        row["kid_domain"] = kernel_distance(real_feats[:n], fake_feats[:n])
        row["kid_domain_floor"] = kernel_distance(real_feats[:n], real_feats[half : half + n])
        row["fd_samples_per_set"] = n
    grid = [images[r * 10 : (r + 1) * 10] for r in range(4)]
    atomic_write_bytes(ROOT / "docs" / "zoo" / f"{key}.png", grid_png(grid, scale=3))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="fmnist-dit,fmnist-unet")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "zoo-quality.json")
    args = ap.parse_args()
    rows = []
    for key in args.models.split(","):
        rows.append(evaluate(key, args.samples, args.batch))
        print(rows[-1], flush=True)
    atomic_write_json(
        args.out,
        {
            "benchmark": "zoo-quality",
            **environment(ROOT),
            "command": "python " + " ".join(sys.argv),
            "models": rows,
        },
    )
    print(args.out)


if __name__ == "__main__":
    main()
