"""Long fuzzing run of the runtime: the test suite's strategies with many more cases.

Random valid policies × every tiny family × batch sizes × steps × CFG on/off (the same
properties as tests/test_fuzz.py), then random broken documents, then random command lines and
hostile files for every CLI command (tests/clifuzz.py: the work stubbed out for ``--cli`` cases,
run for real at small sizes for ``--cli-real`` cases). Records the number of cases run and the
failures (the first failing cases, if any) in benchmarks/results/fuzz.json.

Run: python benchmarks/fuzz.py [--valid 10000] [--invalid 5000] [--cli 10000] [--cli-real 200]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import clifuzz  # noqa: E402
import test_fuzz  # noqa: E402

from stepcache._env import environment  # noqa: E402
from stepcache._io import atomic_write_json  # noqa: E402


def run(name: str, strategy, check, examples: int) -> dict:
    count = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def prop(case):
        nonlocal count
        check(case)  # cases a cross-field check rejects are discarded by hypothesis, not counted
        count += 1

    t0 = time.perf_counter()
    failure = None
    try:
        prop()
    except Exception:  # a falsified property: record it, keep the run's other numbers
        failure = traceback.format_exc(limit=3)[-2000:]
    return {
        "property": name,
        "cases_run": count,
        "failures": 0 if failure is None else 1,
        "first_failure": failure,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def cli_run(n: int, seed: int, small: bool) -> dict:
    """The CLI fuzzer: no traceback, no hang, nothing written on failure, strict JSON on success."""
    t0 = time.perf_counter()

    def progress(i: int, total: int, counts: dict) -> None:
        if i % max(1, total // 20) == 0:
            print(f"  cli {'real' if small else 'stub'} {i}/{total} {counts}", flush=True)

    result = clifuzz.fuzz(n, seed=seed, small=small, progress=progress)
    return {
        "property": "CLI: no traceback, no hang, nothing written on failure"
        + (" (run for real, small sizes)" if small else " (work stubbed out)"),
        "cases_run": n,
        **result,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--valid", type=int, default=10_000)
    ap.add_argument("--invalid", type=int, default=5_000)
    ap.add_argument("--cli", type=int, default=10_000, help="CLI cases with the work stubbed out")
    ap.add_argument("--cli-real", type=int, default=200, help="CLI cases run for real at small sizes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    valid = test_fuzz.test_random_valid_policies_run_on_every_family.hypothesis.inner_test
    invalid = test_fuzz.test_invalid_documents_only_raise_policy_error.hypothesis.inner_test
    results = []
    if args.valid:
        results.append(
            run("valid policies run, finite, accounted, deterministic", test_fuzz.cases(), valid, args.valid)
        )
    if args.invalid:
        results.append(
            run(
                "broken documents raise only PolicyError", test_fuzz.broken_documents(), invalid, args.invalid
            )
        )
    for n, small in ((args.cli, False), (args.cli_real, True)):
        if n:
            results.append(cli_run(n, args.seed, small))
    for r in results:
        print(r, flush=True)
    out = ROOT / "benchmarks" / "results" / "fuzz.json"
    atomic_write_json(
        out,
        {
            "benchmark": "fuzz",
            **environment(ROOT),
            "command": "python " + " ".join(sys.argv),
            "runs": results,
        },
    )
    print(out)


if __name__ == "__main__":
    main()
