"""Where the calibration-to-held-out gap of fitted forecasts comes from: the fit, or the seeds.

For every band policy with fitted weights in a bench result (``stepcache bench MODEL --policy
...``'s result.json), at its own schedule, the weights are fitted again four ways and scored:

- on the 16 calibration seeds, scored there (what the search reports) and on the 16 held-out
  seeds (what it ships);
- on the held-out seeds themselves, scored there: the best a fit can do on those seeds, so
  ``heldout_own_fit - heldout`` is what fitting on other seeds costs (the fit's overfitting);
- on each half of the calibration seeds, scored on the other half (out of fold) and on its own.

A policy scored on two seed sets with nothing fitted (``polynomial_*``: the same schedule with the
polynomial forecast) shows the seed sets' own difference.

Writes benchmarks/results/fitgap-MODEL.json.
Run: python benchmarks/fitgap.py benchmarks/results/search-polished-fmnist-dit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from stepcache import zoo
from stepcache._env import environment
from stepcache._io import atomic_write_json
from stepcache.bench.harness import EVAL_SEED_BASE, make_batch
from stepcache.policy import Policy
from stepcache.search.evaluate import Evaluator

ROOT = Path(__file__).resolve().parent.parent
SEEDS = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="a bench result folder (holds result.json)")
    args = ap.parse_args()
    bench = json.loads((args.result / "result.json").read_text())
    model = bench["model"]
    pipe = zoo.load(model)

    def evaluator(seeds: list[int]) -> Evaluator:
        return Evaluator(pipe, make_batch(pipe, model, None, None, seeds))

    calib = evaluator(list(range(SEEDS)))
    heldout = evaluator([EVAL_SEED_BASE + i for i in range(SEEDS)])
    halves = evaluator(list(range(SEEDS // 2))), evaluator(list(range(SEEDS // 2, SEEDS)))
    rows = []
    for run in bench["runs"]:
        params = run.get("params") or {}
        step = params.get("rules", {}).get("step", {})
        if step.get("method") != "schedule" or step.get("weights") is None:
            continue

        def with_weights(weights: list[float] | None, _params: dict = params) -> Policy:
            rules = {**_params["rules"], "step": {**_params["rules"]["step"], "weights": weights}}
            return Policy.from_dict({**_params, "rules": rules, "meta": {}})

        def fit(ev: Evaluator) -> dict:
            return ev.evaluate(with_weights(None), fit=True)

        on_calib, on_heldout = fit(calib), fit(heldout)
        on_halves = [fit(h) for h in halves]
        out_of_fold = [
            halves[1].evaluate(with_weights(on_halves[0]["weights"]))["psnr"],
            halves[0].evaluate(with_weights(on_halves[1]["weights"]))["psnr"],
        ]
        row = {
            "policy": run["name"],
            "mask": "".join("C" if m else "." for m in step["mask"]),
            "order": step["order"],
            "calibration": on_calib["psnr"],
            "heldout": heldout.evaluate(with_weights(on_calib["weights"]))["psnr"],
            "heldout_own_fit": on_heldout["psnr"],
            "halves_in_fold": [h["psnr"] for h in on_halves],
            "halves_out_of_fold": out_of_fold,
            "polynomial_calibration": calib.evaluate(with_weights(None))["psnr"],
            "polynomial_heldout": heldout.evaluate(with_weights(None))["psnr"],
        }
        row["gap_db"] = row["calibration"] - row["heldout"]
        row["fit_overfit_db"] = row["heldout_own_fit"] - row["heldout"]
        row["seed_sets_gap_db"] = row["polynomial_calibration"] - row["polynomial_heldout"]
        row["out_of_fold_loss_db"] = (sum(row["halves_in_fold"]) - sum(out_of_fold)) / 2
        rows.append(row)
        print(
            f"{run['name']}: calibration {row['calibration']:.2f}, held out {row['heldout']:.2f} "
            f"(own fit {row['heldout_own_fit']:.2f}), out-of-fold loss {row['out_of_fold_loss_db']:+.2f} dB, "
            f"polynomial {row['polynomial_calibration']:.2f} -> {row['polynomial_heldout']:.2f}",
            flush=True,
        )
    if not rows:
        sys.exit(f"{args.result}: no schedule with fitted weights among its runs")
    atomic_write_json(
        ROOT / "benchmarks" / "results" / f"fitgap-{model}.json",
        {
            "benchmark": "fitgap",
            "model": model,
            **environment(ROOT),
            "threads": torch.get_num_threads(),
            "command": "python " + " ".join(sys.argv),
            "source": str(args.result),
            "protocol": {
                "calib_seeds": [0, SEEDS - 1],
                "heldout_seeds": [EVAL_SEED_BASE, EVAL_SEED_BASE + SEEDS - 1],
            },
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
