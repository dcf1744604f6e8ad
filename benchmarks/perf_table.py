"""The README's runtime-cost tables from benchmarks/results/{cpu,gpu}/perf-*.json.

Run: python benchmarks/perf_table.py benchmarks/results/cpu/perf-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def table(doc: dict) -> str:
    lines = [
        "| policy | ms / step | speedup | FLOP ideal | efficiency | overhead | host syncs / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if r.get("compiled"):
            continue
        lines.append(
            f"| {r['policy']} | {r['step_ms']:.1f} | {_f(r.get('speedup'), '.2f', '×')} "
            f"| {_f(r.get('ideal_speedup'), '.2f', '×')} | {_f(r.get('efficiency'), '.3f')} "
            f"| {_f(r.get('overhead_pct'), '+.2f', '%')} | {_f(r.get('host_syncs_per_step'), '.1f')} |"
        )
    compiled = [r for r in doc["rows"] if r.get("compiled")]
    if compiled:
        lines += [
            "",
            "| torch.compile | ms / step | speedup over compiled | eager speedup | kept |",
            "|---|---|---|---|---|",
        ]
        for r in compiled:
            lines.append(
                f"| {r['policy']} | {r['step_ms']:.1f} | {_f(r.get('speedup'), '.2f', '×')} "
                f"| {_f(r.get('eager_speedup'), '.2f', '×')} | {_f(r.get('kept'), '.0%')} |"
            )
    if doc.get("unavailable"):
        lines.append("")
        lines += [f"- not run: {u['policy']}: {u['reason']}" for u in doc["unavailable"]]
    return "\n".join(lines)


def main() -> None:
    for path in map(Path, sys.argv[1:]):
        doc = json.loads(path.read_text())
        print(f"<!-- {path}: {doc['command']} ({doc['device']}, {doc['dtype']}) -->")
        print(table(doc))
        print()


if __name__ == "__main__":
    main()
