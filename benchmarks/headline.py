"""The headline tables of docs/measure.md, from committed compare results (so the prose quotes the files).

For each matched speedup (1.2x, 1.5x, 2x, 3x, 4x): the best stepcache run (presets and searched policies) and
the best peer setting among the runs measured at least that fast (5% timing tolerance), by PSNR.

Run: python benchmarks/headline.py benchmarks/results/compare-fmnist-dit \
         benchmarks/results/search-fmnist-dit.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TARGETS = (1.2, 1.5, 2.0, 3.0, 4.0)


def best(runs: list[dict], kind: str, speed: float) -> dict | None:
    ok = [r for r in runs if r["kind"] == kind and r["speedup"] >= 0.95 * speed and math.isfinite(r["psnr"])]
    return max(ok, key=lambda r: r["psnr"]) if ok else None


def cell(r: dict | None) -> str:
    if r is None:
        return "none this fast"
    fd = "" if r.get("fd_domain") is None else f", FD {r['fd_domain']:.1f}"
    return f"`{r['name']}`: {r['speedup']:.2f}×, {r['psnr']:.1f} dB{fd}"


def table(doc: dict) -> str:
    lines = [
        "| matched speedup | best stepcache | best peer | PSNR difference |",
        "|---|---|---|---|",
    ]
    for t in TARGETS:
        ours, peer = best(doc["runs"], "stepcache", t), best(doc["runs"], "peer", t)
        diff = "—" if ours is None or peer is None else f"{ours['psnr'] - peer['psnr']:+.1f} dB"
        lines.append(f"| ≥ {t:g}× | {cell(ours)} | {cell(peer)} | {diff} |")
    return "\n".join(lines)


def search_table(doc: dict) -> str:
    """benchmarks/search.py's summary: each searched policy beside the best preset and peer at
    its measured speedup, its calibration-vs-held-out gap, budget and oracle ratio."""
    lines = [
        "| target | searcher | measured speedup | held-out PSNR | calib − held-out | budget "
        "| best preset that fast | best peer that fast | oracle ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def short(r: dict | None) -> str:
        return "none" if r is None else f"`{r['name']}` {r['psnr']:.1f} dB ({r['speedup']:.2f}×)"

    for r in doc["rows"]:
        oracle = r.get("oracle") or {}
        ratio = oracle.get("searched_over_oracle_speedup")
        cells = [
            f"{r['target']:g}×",
            r["searcher"],
            f"{r['measured_speedup']:.2f}×",
            f"{r['heldout_psnr']:.1f} dB",
            f"{r['calibration_minus_heldout_db']:+.2f} dB",
            f"{r['budget_used']:.1f}",
            short(r["best_preset"]),
            short(r["best_peer"]),
            "—" if ratio is None else f"{ratio:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    for path in map(Path, sys.argv[1:]):
        if path.is_dir():
            doc = json.loads((path / "result.json").read_text())
            print(f"<!-- {path}/result.json: {doc['command']} ({doc['device']}) -->")
            print(table(doc))
        else:
            doc = json.loads(path.read_text())
            print(f"<!-- {path}: {doc['command']} ({doc['device']}) -->")
            print(search_table(doc))
        print()


if __name__ == "__main__":
    main()
