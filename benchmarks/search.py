"""Searched policies vs presets, peers and the AutoDiffusion-style baseline, on one zoo model.

For each speedup target: ``stepcache.search`` with TPE (seeded by the planner) and the
evolutionary timestep baseline, both at the same budget, calibrated on seeds 0..15. Then one
``compare`` run measures, side by side on the held-out seeds 10000..10015, the preset sweep, the
peers (cache-dit, diffusers' hooks) and every searched policy. The summary puts each searched
policy beside the best preset and the best peer at its measured speedup, its calibration vs
held-out PSNR gap, its budget, and the oracle limit.

Writes benchmarks/results/search-MODEL.json (summary), benchmarks/results/compare-MODEL/
(result.json, report.html, samples) and the searched policies under benchmarks/results/policies/.
Run: OMP_NUM_THREADS=1 python benchmarks/search.py --model fmnist-dit [--targets 2,3,4] [--tag T]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.bench.compare import compare
from stepcache.policy import Policy
from stepcache.search import search

ROOT = Path(__file__).resolve().parent.parent


def best_at(runs: list[dict], speed: float, kinds: tuple[str, ...], peer: bool) -> dict | None:
    """The highest-PSNR run of these kinds at least as fast as ``speed`` (5% timing tolerance)."""
    ok = [
        r
        for r in runs
        if r["kind"] in kinds
        and (r["kind"] == "peer") == peer
        and r["speedup"] >= 0.95 * speed
        and math.isfinite(r["psnr"])
    ]
    return max(ok, key=lambda r: r["psnr"]) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="fmnist-dit")
    ap.add_argument("--targets", default="2,3,4")
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peers", default="cache-dit,diffusers")
    ap.add_argument("--tag", default="", help="suffix for the output names, e.g. low for --targets 1.25,1.5")
    ap.add_argument(
        "--searchers", default="tpe,evolution,anneal,ecad", help="tpe is ours; the others baselines"
    )
    ap.add_argument(
        "--no-compare", action="store_true", help="searchers only: held-out numbers from each search"
    )
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    pol_dir = ROOT / "benchmarks" / "results" / "policies"
    searched: list[tuple[float, str, Policy]] = []
    suffix = f"-{args.tag}" if args.tag else ""
    for target in targets:
        for searcher in args.searchers.split(","):
            out = pol_dir / f"{args.model}-{searcher}-{target:g}x{suffix}.json"
            print(f"search {args.model} {searcher} {target}x", flush=True)
            pol = search(
                args.model,
                speedup=target,
                budget=args.budget,
                searcher=searcher,
                calib_seeds=args.seeds,
                heldout_seeds=args.seeds,
                oracle=searcher == "tpe",
                out=out,
                command="python " + " ".join(sys.argv),
            )
            pol = Policy.from_dict({**pol.to_dict(), "name": f"searched {searcher} {target:g}x"})
            searched.append((target, searcher, pol))
            print(json.dumps({k: pol.meta[k] for k in ("calibration", "heldout", "budget_used")}), flush=True)

    if args.no_compare:
        gaps = _seed_set_gaps(args.model, targets, args.seeds)
        rows = [_searcher_row(t, s, p) for t, s, p in searched]
        for row in rows:
            row["seed_set_gap_db"] = gaps[row["target"]]["gap_db"]
            row["excess_gap_db"] = row["calibration_minus_heldout_db"] - row["seed_set_gap_db"]
        _write(args, suffix, rows, {"seed_set_gap": list(gaps.values())})
        return
    out_dir = ROOT / "benchmarks" / "results" / f"compare-{args.model}{suffix}"
    doc = compare(
        args.model,
        out_dir,
        peers=[p for p in args.peers.split(",") if p],
        policies=[p for _, _, p in searched],
        seeds=args.seeds,
        repeats=args.repeats,
        command="python " + " ".join(sys.argv),
        progress=lambda name, i, n: print(f"[{i + 1}/{n}] {name}", flush=True),
    )
    runs = {r["name"]: r for r in doc["runs"]}
    rows = []
    for target, searcher, pol in searched:
        r = runs[pol.name]
        # presets only: the searched policies are stepcache runs too
        preset = best_at(
            [x for x in doc["runs"] if not x["name"].startswith("searched")],
            r["speedup"],
            ("stepcache",),
            peer=False,
        )
        peer = best_at(doc["runs"], r["speedup"], ("peer",), peer=True)
        meta = pol.meta
        rows.append(
            {
                "target": target,
                "searcher": searcher,
                "measured_speedup": r["speedup"],
                "heldout_psnr": r["psnr"],
                "heldout_fd_domain": r["fd_domain"],
                "calibration_psnr": meta["calibration"]["psnr"],
                "calibration_minus_heldout_db": meta["calibration"]["psnr"] - meta["heldout"]["psnr"],
                "budget_used": meta["budget_used"],
                "best_preset": None
                if preset is None
                else {k: preset[k] for k in ("name", "speedup", "psnr")},
                "best_peer": None if peer is None else {k: peer[k] for k in ("name", "speedup", "psnr")},
                "oracle": meta.get("oracle") or None,
            }
        )
        print(rows[-1], flush=True)
    _write(args, suffix, rows)


def _searcher_row(target: float, searcher: str, pol: Policy) -> dict:
    """A searcher's result from its own held-out evaluation (FLOP speedup predicted by the cost
    model, wall-clock measured by the search on the held-out seeds)."""
    meta = pol.meta
    row = {
        "target": target,
        "searcher": searcher,
        "flop_speedup": meta["calibration"]["predicted_speedup"],
        "measured_speedup": meta["heldout"]["measured_speedup"],
        "heldout_psnr": meta["heldout"]["psnr"],
        "heldout_psnr_ci": meta["heldout"].get("psnr_ci"),
        "calibration_psnr": meta["calibration"]["psnr"],
        "calibration_minus_heldout_db": meta["calibration"]["psnr"] - meta["heldout"]["psnr"],
        "budget_used": meta["budget_used"],
        "evaluated": meta["search"]["evaluated"],
    }
    print(row, flush=True)
    return row


def _seed_set_gaps(model: str, targets: list[float], seeds: int) -> dict[float, dict]:
    """How much easier the calibration seeds are than the held-out ones for a policy nobody
    chose on them: static-interval at each target's interval, scored on both seed sets. A
    searched policy's calibration-minus-held-out gap beyond this is what the search overfitted."""
    from stepcache import presets
    from stepcache.bench.harness import batch_for
    from stepcache.pipelines import load_pipeline
    from stepcache.search.evaluate import Evaluator

    loaded = load_pipeline(model)  # one pipeline and one reference per seed set, for every target
    evs = {
        part: Evaluator(loaded.pipe, batch_for(loaded, None, part, seeds, None, None))
        for part in ("calib", "heldout")
    }
    gaps = {}
    for target in targets:
        interval = max(2, round(target))
        policy = presets.get("static-interval", interval=interval)
        psnr = {part: ev.evaluate(policy)["psnr"] for part, ev in evs.items()}
        gaps[target] = {
            "target": target,
            "policy": f"static-interval interval={interval}",
            "calibration_psnr": psnr["calib"],
            "heldout_psnr": psnr["heldout"],
            "gap_db": psnr["calib"] - psnr["heldout"],
        }
    return gaps


def _write(args: argparse.Namespace, suffix: str, rows: list[dict], extra: dict | None = None) -> None:
    atomic_write_json(
        ROOT / "benchmarks" / "results" / f"search-{args.model}{suffix}.json",
        {
            "benchmark": "search",
            "model": args.model,
            **environment(ROOT),
            "threads": torch.get_num_threads(),
            "command": "python " + " ".join(sys.argv),
            "protocol": {
                "budget": args.budget,
                "calib_seeds": [0, args.seeds - 1],
                "heldout_seeds": [10_000, 10_000 + args.seeds - 1],
                "repeats": args.repeats,
            },
            "rows": rows,
            **(extra or {}),
        },
    )


if __name__ == "__main__":
    main()
