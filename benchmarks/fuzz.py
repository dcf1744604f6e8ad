"""Long fuzzing run of the runtime: the test suite's strategies with many more cases.

Random valid policies × every tiny family × batch sizes × steps × CFG on/off (the same
properties as tests/test_fuzz.py), then random broken documents. Records the number of cases
run and the failures (the first failing case, if any) in benchmarks/results/fuzz.json.

Run: python benchmarks/fuzz.py [--valid 10000] [--invalid 5000]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--valid", type=int, default=10_000)
    ap.add_argument("--invalid", type=int, default=5_000)
    args = ap.parse_args()
    valid = test_fuzz.test_random_valid_policies_run_on_every_family.hypothesis.inner_test
    invalid = test_fuzz.test_invalid_documents_only_raise_policy_error.hypothesis.inner_test
    results = [
        run("valid policies run, finite, accounted, deterministic", test_fuzz.cases(), valid, args.valid),
        run("broken documents raise only PolicyError", test_fuzz.broken_documents(), invalid, args.invalid),
    ]
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
