"""Host syncs per step of each policy on each architecture, counted on PyTorch's meta device.

No arithmetic runs on ``meta``, so this needs neither a GPU nor time, and every read of a device
value (``.item()``, ``bool()``, ``.cpu()``, ``.tolist()``) is caught (stepcache.bench.syncs). The
count does not depend on the device: it is the runtime's, at the architectures' real sizes.

Writes benchmarks/results/syncs.json. Run: python benchmarks/gpu/syncs.py [--size full]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import stepcache
from stepcache._env import environment
from stepcache._io import atomic_write_json

sys.path.insert(0, str(Path(__file__).parent))
import perf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="full", choices=("tiny", "medium", "full"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "syncs.json"))
    args = ap.parse_args(argv)
    rows = []
    for arch in perf.ARCHS:
        for name, policy in perf.policies(args.steps):
            try:
                row = perf.meta_syncs(arch, args.size, policy, args.steps)
            except stepcache.UnsupportedModelError:
                continue
            rows.append({"arch": arch, "policy": name, **row})
            print(arch, name, row["host_syncs_per_step"], flush=True)
    doc = {
        "benchmark": "host-syncs",
        **environment(ROOT),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "size": args.size,
        "steps": args.steps,
        "rows": rows,
    }
    atomic_write_json(Path(args.out), doc)
    print(args.out)
    return doc


if __name__ == "__main__":
    main()
