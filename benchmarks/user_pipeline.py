"""Search on a pipeline the zoo does not ship: fmnist-dit with DPM-Solver++ (2M), loaded through
its ``module:function`` factory and a workload file, as a user would. A searched 2x policy
against every preset of the compare sweep on the held-out seeds: PSNR at matched FLOPs.

Writes benchmarks/results/user-pipeline-fmnist-dpmpp.json (and the bench report folder beside).
Run from the repository root: python benchmarks/user_pipeline.py [--speedup 2] [--budget 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import stepcache
from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.workload import Workload

ROOT = Path(__file__).resolve().parent.parent
SPEC = "benchmarks.factories:fmnist_dit_dpmpp"
WORKLOAD = ROOT / "benchmarks" / "workloads" / "fmnist-dpmpp.json"


KEPT = ("name", "psnr", "psnr_ci", "ssim", "flop_fraction", "speedup", "speedup_ci", "actions")


def _row(run: dict) -> dict:
    return {k: run[k] for k in KEPT}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "user-pipeline-fmnist-dpmpp.json"
    )
    args = ap.parse_args()
    os.chdir(ROOT)  # the factory is imported from the repository root
    torch.set_num_threads(1)
    wl = Workload.load(WORKLOAD)
    t0 = time.perf_counter()
    searched = stepcache.search(SPEC, wl, speedup=args.speedup, budget=args.budget, oracle=False)
    search_s = time.perf_counter() - t0
    search_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    # every preset of compare's sweep at its default and a faster setting, and the searched one
    doc = stepcache.compare(
        SPEC, wl, peers=[], policies=[searched], repeats=args.repeats, out_dir=args.out.with_suffix("")
    )
    ref = next(r for r in doc["runs"] if r["kind"] == "reference")
    ours = next(r for r in doc["runs"] if r["name"] == searched.name)
    ideal = 1 / ours["flop_fraction"]
    rivals = [
        r
        for r in doc["runs"]
        if r["kind"] == "stepcache" and r["name"] != searched.name and 1 / r["flop_fraction"] >= ideal * 0.95
    ]
    best = max(rivals, key=lambda r: r["psnr"]) if rivals else None
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    result = {
        **environment(),
        "command": "python " + " ".join(sys.argv),
        "commit": commit,
        "pipeline": SPEC,
        "workload": wl.to_dict(),
        "search": {
            "target_speedup": args.speedup,
            "budget": args.budget,
            "seconds": round(search_s, 1),
            "peak_rss_mib": round(search_rss, 1),
            "policy": searched.to_dict(),
        },
        "searched": _row(ours),
        "best_preset_at_matched_flops": _row(best) if best is not None else None,
        "presets": [
            {k: r[k] for k in ("name", "psnr", "flop_fraction", "speedup")}
            for r in doc["runs"]
            if r["kind"] == "stepcache"
        ],
        "unavailable": doc["unavailable"],
        "reference_latency_s": ref["latency_s"]["median"],
    }
    atomic_write_json(args.out, result)
    line = f"searched {ours['psnr']:.2f} dB at {ideal:.2f}x FLOPs ({ours['speedup']:.2f}x measured)"
    if best is not None:
        line += f"; best preset at >= {0.95 * ideal:.2f}x FLOPs: {best['name']} {best['psnr']:.2f} dB"
    print(line)
    print(args.out)


if __name__ == "__main__":
    main()
