"""Every preset (step, block and guidance level) at three settings vs full compute, on one zoo model.

For each setting: computed fraction (network row-evaluations run in full over those of full
compute with CFG) and FLOP fraction (torch.utils.flop_counter), cache memory per sample,
measured wall-clock speedup (one batch of all seeds, warm-up excluded, median
of interleaved repeats), PSNR and SSIM vs full compute per image with 95% bootstrap intervals,
and for the Fashion-MNIST models class accuracy under the domain classifier and FD-domain vs the
real test set. emoji-dit samples the 16 demo captions, 4 seeds each for 64 seeds. Evaluation
seeds are 10_000 + i, disjoint from the calibration seeds 0..15 of the "calibrated" settings
(linear-ag, teacache, magcache with coefficients from stepcache.calibrate).

Writes benchmarks/results/methods-MODEL.json and docs/methods-MODEL.png.
Run: python benchmarks/methods.py --model fmnist-dit [--seeds 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import stepcache
from stepcache import presets, zoo
from stepcache._env import environment
from stepcache._io import atomic_write_bytes, atomic_write_json
from stepcache.calibration import calibrated
from stepcache.methods import methods
from stepcache.metrics import bootstrap_ci, frechet_distance, psnr_per_image, ssim_per_image
from stepcache.zoo.classifier import classifier_for

ROOT = Path(__file__).resolve().parent.parent
SETTINGS: dict[str, list[tuple[str, dict]]] = {
    "static-interval": [("conservative", {"warmup": 3}), ("default", {}), ("aggressive", {"interval": 4})],
    "teacache": [
        ("conservative", {"threshold": 0.08}),
        ("default", {}),
        ("aggressive", {"threshold": 0.4}),
    ],
    "magcache": [
        ("conservative", {"threshold": 0.02}),
        ("default", {}),
        ("aggressive", {"threshold": 0.3, "max_consecutive": 3}),
    ],
    "taylorseer": [("conservative", {"interval": 2}), ("default", {}), ("aggressive", {"interval": 5})],
    "adams-bashforth": [("conservative", {"warmup": 4}), ("default", {}), ("aggressive", {"interval": 3})],
    "fsampler": [("conservative", {"damping": 0.7}), ("default", {}), ("aggressive", {"interval": 3})],
    "fbcache": [
        ("conservative", {"threshold": 0.05}),
        ("default", {}),
        ("aggressive", {"threshold": 0.3, "max_consecutive": 4}),
    ],
    "dbcache": [
        ("conservative", {"threshold": 0.05}),
        ("default", {}),
        ("aggressive", {"threshold": 0.3, "max_consecutive": 4}),
    ],
    "delta-dit": [
        ("conservative", {"blocks": 1}),
        ("default", {}),
        ("aggressive", {"blocks": 4, "interval": 3}),
    ],
    "taylorseer-feature": [
        ("conservative", {"interval": 2}),
        ("default", {}),
        ("aggressive", {"interval": 4}),
    ],
    "hyca": [("conservative", {"interval": 2}), ("default", {}), ("aggressive", {"interval": 4})],
    "cg-taylor": [
        ("conservative", {"threshold": 0.05}),
        ("default", {}),
        ("aggressive", {"threshold": 0.25, "max_consecutive": 4}),
    ],
    "bwcache": [
        ("conservative", {"threshold": 0.03}),
        ("default", {}),
        ("aggressive", {"threshold": 0.15, "max_consecutive": 4}),
    ],
    "toca": [
        ("conservative", {"ratio": 0.5}),
        ("default", {}),
        ("aggressive", {"ratio": 0.15, "interval": 4}),
    ],
    "bottleneck": [
        ("conservative", {"scale": 0.75, "start": 0.5, "end": 0.9}),
        ("default", {}),
        ("aggressive", {"start": 0.2, "end": 0.9}),
    ],
    "fora": [("conservative", {"interval": 2}), ("default", {}), ("aggressive", {"interval": 5})],
    "deepcache": [("conservative", {"interval": 2}), ("default", {}), ("aggressive", {"interval": 5})],
    "adaptive-guidance": [
        ("conservative", {"threshold": 0.999}),
        ("default", {}),
        ("aggressive", {"threshold": 0.98, "warmup": 1}),
    ],
    "guidance-interval": [("conservative", {"end": 0.85}), ("default", {}), ("aggressive", {"end": 0.5})],
    "cfg-cache": [("conservative", {"warmup": 4}), ("default", {}), ("aggressive", {"interval": 3})],
    "linear-ag": [("conservative", {"end": 0.3}), ("default", {}), ("aggressive", {"end": 1.0})],
    # One step-level and one guidance-level method in one policy.
    "taylorseer+adaptive-guidance": [
        ("conservative", {"taylorseer": {"interval": 2}, "adaptive-guidance": {"threshold": 0.999}}),
        ("default", {"taylorseer": {}, "adaptive-guidance": {}}),
        (
            "aggressive",
            {"taylorseer": {"interval": 4}, "adaptive-guidance": {"threshold": 0.98, "warmup": 1}},
        ),
    ],
}


# Methods with fitted coefficients also run with them, fitted on seeds 0..CALIB_SEEDS-1.
CALIBRATED = {name: {} for name in calibrated()}
CALIB_SEEDS = 16


def settings_for(name: str) -> list[tuple[str, dict]]:
    """The settings above, or for a method dropped in since: its preset and the sweep it declares."""
    if name in SETTINGS:
        return list(SETTINGS[name])
    sweep = methods()[name].sweep
    return [("default", {})] + [(f"sweep {i}", dict(s)) for i, s in enumerate(sweep) if s]


def make_policy(name: str, params: dict) -> stepcache.Policy:
    if "+" not in name:
        return presets.get(name, **params)
    return stepcache.compose(*(presets.get(part, **params[part]) for part in name.split("+")))


def row_fractions(stats: dict) -> tuple[float, float]:
    """(full, partial) fraction of row-evaluations: C rows ran in full, P rows ran part of the
    network; E (estimated) and G (unconditional row left out) rows ran nothing."""
    letters = "".join(stats["row_actions"])
    return letters.count("C") / len(letters), letters.count("P") / len(letters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="fmnist-dit")
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", default=",".join([*SETTINGS, *(m for m in methods() if m not in SETTINGS)]))
    ap.add_argument(
        "--merge",
        action="store_true",
        help="replace only these presets' rows in the committed JSON, keep the others (same protocol)",
    )
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the committed JSON")
    args = ap.parse_args()
    if args.replot:
        doc = json.loads((ROOT / "benchmarks" / "results" / f"methods-{args.model}.json").read_text())
        plot(doc["runs"], args.model, ROOT / "docs" / f"methods-{args.model}.png")
        return

    pipe = zoo.load(args.model)
    steps, guidance = pipe.default_steps, pipe.default_guidance
    text = zoo.spec(args.model).conditioning == "text"
    if text:
        from stepcache.zoo.text import DEMO_PROMPTS

        labels = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(args.seeds)]
        clf = None
    else:
        labels = [i % 10 for i in range(args.seeds)]
        clf = classifier_for(args.model)
    real_feats = None
    if clf is not None and clf.feature_net is not None:
        from stepcache.zoo.data import load_fashion_mnist

        real, _ = load_fashion_mnist("test")
        real_feats = clf.features(((real + 1) / 2).permute(0, 2, 3, 1).numpy())

    def generate() -> np.ndarray:
        # One generator per sample, so each seed's noise does not depend on the batch.
        noise_seeds = [10_000 + i for i in range(args.seeds)]
        gens = [torch.Generator().manual_seed(s) for s in noise_seeds]
        cond = {"prompt": labels} if text else {"class_labels": labels}
        return pipe(**cond, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images

    def timed(policy) -> tuple[np.ndarray, float, dict]:
        handle = stepcache.enable(pipe, policy) if policy is not None else None
        t0 = time.perf_counter()
        images = generate()
        seconds = time.perf_counter() - t0
        stats = handle.stats() if handle is not None else {}
        stepcache.disable(pipe)
        return images, seconds, stats

    def flops(policy) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        handle = stepcache.enable(pipe, policy) if policy is not None else None
        with FlopCounterMode(display=False) as counter:
            generate()
        if handle is not None:
            stepcache.disable(pipe)
        return float(counter.get_total_flops())

    def calibrated(name: str) -> stepcache.Policy | None:
        from stepcache.calibration import calibrate

        cond = {"prompt": labels[:CALIB_SEEDS]} if text else {"class_labels": labels[:CALIB_SEEDS]}
        gens = [torch.Generator().manual_seed(s) for s in range(CALIB_SEEDS)]
        try:
            return calibrate(
                name,
                pipe,
                lambda: pipe(**cond, num_inference_steps=steps, guidance_scale=guidance, generator=gens),
                **CALIBRATED[name],
            )
        except stepcache.UnsupportedModelError:
            return None

    reference, _, _ = timed(None)  # warm-up
    full_flops = flops(None)
    rows = []
    for name in args.presets.split(","):
        settings = settings_for(name)
        if name in CALIBRATED:
            settings.append(("calibrated", None))
        for setting, params in settings:
            policy = make_policy(name, params) if params is not None else calibrated(name)
            if policy is None:
                print(f"skip {name} {setting}: not applicable to {args.model}", flush=True)
                continue
            try:
                timed(policy)  # warm-up
            except stepcache.UnsupportedModelError as e:  # block rules on a model with no block stack
                print(f"skip {name}: {e}", flush=True)
                break
            ref_times, acc_times = [], []
            for _ in range(args.repeats):
                ref_times.append(timed(None)[1])
                images, seconds, stats = timed(policy)
                acc_times.append(seconds)
            psnr = psnr_per_image(images, reference)
            ssim = ssim_per_image(images, reference)
            finite = psnr[np.isfinite(psnr)]
            row = {
                "preset": name,
                "setting": setting,
                "params": {lvl: {"method": r.method, **r.params} for lvl, r in policy.rules.items()},
                "calibration_seeds": [0, CALIB_SEEDS - 1] if params is None else None,
                "nfe_fraction": row_fractions(stats)[0],
                "partial_fraction": row_fractions(stats)[1],
                "cfg_skipped": stats["cfg_skipped"],
                "speedup": statistics.median(ref_times) / statistics.median(acc_times),
                "latency_s": {
                    "reference_median": statistics.median(ref_times),
                    "accelerated_median": statistics.median(acc_times),
                },
                "psnr": float(finite.mean()) if finite.size else None,
                "psnr_ci": bootstrap_ci(psnr),
                "ssim": float(ssim.mean()),
                "ssim_ci": bootstrap_ci(ssim),
                "class_acc": clf.accuracy(images, labels) if clf is not None else None,
                "fallbacks": stats.get("fallbacks", 0),
                "flop_fraction": flops(policy) / full_flops,
                "cache_bytes_per_sample": stats["cache_bytes"] / args.seeds,
            }
            if real_feats is not None:
                row["fd_domain"] = frechet_distance(real_feats[: args.seeds * 4], clf.features(images))
            rows.append(row)
            print(
                {k: row[k] for k in ("preset", "setting", "flop_fraction", "speedup", "psnr", "class_acc")},
                flush=True,
            )

    ref_row = {"class_acc": clf.accuracy(reference, labels) if clf is not None else None}
    if real_feats is not None:
        ref_row["fd_domain"] = frechet_distance(real_feats[: args.seeds * 4], clf.features(reference))
    out = ROOT / "benchmarks" / "results" / f"methods-{args.model}.json"
    command = "python " + " ".join(sys.argv)
    if args.merge:
        old = json.loads(out.read_text())
        same = {"seeds": args.seeds, "repeats": args.repeats, "steps": steps, "guidance": guidance}
        if any(old["protocol"][k] != v for k, v in same.items()):
            raise SystemExit(f"--merge: {out} was measured with {old['protocol']}, not {same}")
        chosen = set(args.presets.split(","))
        rows = [r for r in old["runs"] if r["preset"] not in chosen] + rows
        commands = old.get("commands", [old["command"]])
        command, extra = old["command"], {"commands": [*commands, command]}
    else:
        extra = {}
    atomic_write_json(
        out,
        {
            "benchmark": "methods",
            "model": args.model,
            **environment(ROOT),
            "command": command,
            **extra,
            "protocol": {
                "steps": steps,
                "guidance": guidance,
                "seeds": args.seeds,
                "repeats": args.repeats,
                "seed_range": [10_000, 10_000 + args.seeds - 1],
            },
            "reference": ref_row,
            "runs": rows,
        },
    )
    plot(rows, args.model, ROOT / "docs" / f"methods-{args.model}.png")
    print(out)


def plot(rows: list[dict], model: str, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    names = list(dict.fromkeys(r["preset"] for r in rows))
    markers = "osD^v<>phXP*dH8"
    for i, name in enumerate(names):
        pts = sorted(
            (r for r in rows if r["preset"] == name and r["psnr"] is not None), key=lambda r: r["speedup"]
        )
        ax.plot(
            [r["speedup"] for r in pts],
            [r["psnr"] for r in pts],
            marker=markers[i % len(markers)],
            color=plt.cm.tab20(i % 20),
            label=name,
        )
        for r in pts:
            lo, hi = r["psnr_ci"]
            ax.errorbar(
                r["speedup"], r["psnr"], yerr=[[r["psnr"] - lo], [hi - r["psnr"]]], color="grey", lw=0.8
            )
    ax.set_xlabel("measured wall-clock speedup vs full compute")
    ax.set_ylabel("PSNR vs full compute (dB), 95% CI")
    ax.set_title(f"{model}: speed vs fidelity (CPU)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    main()
