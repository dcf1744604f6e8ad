"""Quality of the zoo's full-compute models, each distance with its real-vs-real floor.

Class-conditional models: N samples (labels balanced over the classes) at the default steps and
guidance; class accuracy under the shipped domain classifier; FD-domain and KID-domain vs the
real test set in that classifier's feature space; FD-EffNetLite0 on ImageNet EfficientNet-Lite0
features. emoji-dit: one sample per caption of the held-out Twemoji images (the same emoji names,
other artwork, never trained on); FD-EffNetLite0 vs those images. Every floor is the same metric
between two disjoint halves of the real set. None of these numbers is FID.
Writes benchmarks/results/zoo-quality.json and docs/zoo/KEY.png (a sample grid per model).

shapes-dit / shapes-video: the shapes judge's accuracy per criterion and caption kind, on training
captions and on the held-out combinations (zoo.shapes), with fresh noise seeds.

Run: python benchmarks/zoo_quality.py [--models fmnist-dit,fmnist-unet,emoji-dit] [--samples 2000]
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
from stepcache.metrics import effnet_lite0_features, frechet_distance, kernel_distance
from stepcache.zoo.classifier import classifier_for
from stepcache.zoo.data import load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


GRIDS = ROOT / "docs" / "zoo"


def generate(pipe, labels: list, batch: int, seed: int) -> np.ndarray:
    """Samples for class labels (ints) or prompts (strings), ``batch`` at a time."""
    out = []
    for i in range(0, len(labels), batch):
        gen = torch.Generator().manual_seed(seed + i)
        cond = labels[i : i + batch]
        out.append(
            pipe(
                **({"prompt": cond} if isinstance(cond[0], str) else {"class_labels": cond}),
                num_inference_steps=pipe.default_steps,
                guidance_scale=pipe.default_guidance,
                generator=gen,
            ).images
        )
    return np.concatenate(out)


def _effnet(images: np.ndarray) -> torch.Tensor:
    """EfficientNet-Lite0 features of (N, H, W, C) images in [0, 1]."""
    return effnet_lite0_features(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float())


def _with_floor(row: dict, name: str, real: torch.Tensor, fake: torch.Tensor, n: int) -> None:
    """FD of fake vs the first n real, and the floor: first n real vs the next n."""
    row[name] = frechet_distance(real[:n], fake[:n])
    row[f"{name}_floor"] = frechet_distance(real[:n], real[n : 2 * n])


def evaluate_text(
    key: str, batch: int, effnet_samples: int, weights_dir: Path | None = None, grid_dir: Path = GRIDS
) -> dict:
    from stepcache.zoo.text import DEMO_PROMPTS, load_emoji_images

    pipe = zoo.load(key, weights_dir=weights_dir)
    held_out, captions = load_emoji_images(vendor="twitter")
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()
    n = min(effnet_samples, len(order) // 2)
    prompts = [captions[i] for i in order[:n]]
    t0 = time.perf_counter()
    images = generate(pipe, prompts, batch, seed=1000)
    seconds = time.perf_counter() - t0
    real = _effnet(((held_out[order[: 2 * n]] + 1) / 2).permute(0, 2, 3, 1).numpy())
    row: dict = {
        "model": key,
        "samples": n,
        "steps": pipe.default_steps,
        "guidance": pipe.default_guidance,
        "generation_seconds": round(seconds, 1),
        "held_out": "emoji-datasource-twitter images of the same emoji names (not trained on)",
    }
    # Generated for the captions of the first half; the floor compares the two real halves.
    _with_floor(row, "fd_effnetlite0", real, _effnet(images), n)
    grid_prompts = list(DEMO_PROMPTS)[:8]
    grid = generate(pipe, grid_prompts * 4, 32, seed=7)
    rows = [grid[r * 8 : (r + 1) * 8] for r in range(4)]
    atomic_write_bytes(grid_dir / f"{key}.png", grid_png(rows, scale=3))
    row["grid_prompts"] = grid_prompts
    return row


def evaluate_shapes(
    key: str, samples: int, batch: int, weights_dir: Path | None = None, grid_dir: Path = GRIDS
) -> dict:
    """Judge accuracy of full-compute samples by caption kind, on the training captions and on the
    held-out combinations (never trained on); ``samples`` per group, fresh noise seeds."""
    from stepcache.zoo import shapes
    from stepcache.zoo.pipeline import unstrip

    pipe = zoo.load(key, weights_dir=weights_dir)
    kinds = ["video"] if pipe.is_video else ["single", "pair"]
    row: dict = {"model": key, "samples_per_group": samples, "steps": pipe.default_steps}
    row["guidance"] = pipe.default_guidance
    t0 = time.perf_counter()
    for kind in kinds:
        for split in ("train", "held_out"):
            pool = shapes.captions(kind, split)
            rng = np.random.default_rng(len(pool))
            texts = [pool[int(i)] for i in rng.integers(0, len(pool), samples)]
            images = generate(pipe, texts, batch, seed=1000)
            judged = unstrip(images, pipe.sample_shape[1]) if pipe.is_video else images
            row[f"{kind}_{split}"] = shapes.accuracy(texts, judged)
    row["generation_seconds"] = round(time.perf_counter() - t0, 1)
    row["held_out"] = (
        f"objects never drawn in training: {', '.join(' '.join(o) for o in shapes.HELD_OUT_OBJECTS)}; "
        f"and {shapes.HELD_OUT_FRACTION:.0%} of the other two-object and video captions"
    )
    grid_texts = [shapes.captions(kinds[-1], "train")[i * 7] for i in range(8)]
    grid = generate(pipe, grid_texts * 4, 32, seed=7)
    rows = [grid[r * 8 : (r + 1) * 8] for r in range(4)]
    if pipe.is_video:  # a filmstrip per sample: one row each, 8 samples
        rows = [grid[i : i + 1] for i in range(8)]
    atomic_write_bytes(grid_dir / f"{key}.png", grid_png(rows, scale=3))
    row["grid_prompts"] = grid_texts
    return row


def evaluate(
    key: str,
    samples: int,
    batch: int,
    effnet_samples: int,
    weights_dir: Path | None = None,
    grid_dir: Path = GRIDS,
) -> dict:
    if zoo.spec(key).world == "shapes":
        return evaluate_shapes(key, samples, batch, weights_dir, grid_dir)
    if zoo.spec(key).conditioning == "text":
        return evaluate_text(key, batch, effnet_samples, weights_dir, grid_dir)
    pipe = zoo.load(key, weights_dir=weights_dir)
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
        m = min(effnet_samples, samples, half)
        real_eff = _effnet(real_images[: 2 * m])
        _with_floor(row, "fd_effnetlite0", real_eff, _effnet(images[:m]), m)
        row["fd_effnetlite0_samples_per_set"] = m
    grid = [images[r * 10 : (r + 1) * 10] for r in range(4)]
    atomic_write_bytes(grid_dir / f"{key}.png", grid_png(grid, scale=3))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="fmnist-dit,fmnist-unet,emoji-dit")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--effnet-samples", type=int, default=1000, help="images per set for FD-EffNetLite0")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "zoo-quality.json")
    ap.add_argument(
        "--weights-dir", type=Path, default=None, help="weights to judge instead of the shipped ones"
    )
    ap.add_argument("--grid-dir", type=Path, default=GRIDS, help="where the sample grids go")
    args = ap.parse_args()
    keys = args.models.split(",")
    if args.weights_dir is not None and len(keys) != 1:
        ap.error("--weights-dir judges one model: pass a single --models KEY")
    rows = []
    for key in keys:
        rows.append(
            evaluate(key, args.samples, args.batch, args.effnet_samples, args.weights_dir, args.grid_dir)
        )
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
