"""The runtime-cost tables of docs/results.md from benchmarks/results/{cpu,gpu}/perf-*.json.

Run: python benchmarks/perf_table.py [--summary] benchmarks/results/cpu/perf-*.json
(--summary: one line per architecture instead of a table per file)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _speedup(r: dict) -> str:
    """The measured speedup with its bootstrap interval; a reading above the FLOP ideal is shown as
    noise against the ideal, never as a result (skipped work cannot buy more time than it costs)."""
    s, ideal, ci = r.get("speedup"), r.get("ideal_speedup"), r.get("speedup_interval")
    if s is None:
        return "—"
    band = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and ci[1] - ci[0] >= 0.005 else ""
    if ideal is not None and s > ideal * (1 + 1e-9):
        return f"≤ {ideal:.2f}× ‡ (read {s:.2f}×{band})"
    return f"{s:.2f}×{band}"


def _efficiency(r: dict) -> str:
    e = r.get("efficiency")
    return "—" if e is None else ("1.000 ‡" if e > 1 + 1e-9 else f"{e:.3f}")


def table(doc: dict) -> str:
    lines = [
        "| policy | ms / step | speedup | FLOP ideal | efficiency | overhead | host syncs / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if r.get("compiled"):
            continue
        lines.append(
            f"| {r['policy']} | {r['step_ms']:.1f} | {_speedup(r)} "
            f"| {_f(r.get('ideal_speedup'), '.2f', '×')} | {_efficiency(r)} "
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
                f"| {r['policy']} | {r['step_ms']:.1f} | {_speedup(r)} "
                f"| {_f(r.get('eager_speedup'), '.2f', '×')} | {_f(r.get('kept'), '.0%')} |"
            )
    if any("‡" in line for line in lines):
        lines += ["", "‡ read above the FLOP ideal: timing noise, not a result."]
    if doc.get("unavailable"):
        lines.append("")
        lines += [f"- not run: {u['policy']}: {u['reason']}" for u in doc["unavailable"]]
    return "\n".join(lines)


def _row(doc: dict, policy: str) -> dict | None:
    return next((r for r in doc["rows"] if r["policy"] == policy and not r.get("compiled")), None)


def _get(doc: dict, policy: str, key: str) -> float | None:
    row = _row(doc, policy)
    return None if row is None else row.get(key)


def summary(docs: list[dict]) -> str:
    lines = [
        "| architecture | step, no stepcache | always-compute overhead | static efficiency (2×–4×) "
        "| adaptive efficiency: "
        "fbcache / diffusers FBC / cache-dit | never-skip overhead: fbcache / diffusers FBC / cache-dit "
        "| compiled speedup kept (static 2, fbcache) |",
        "|---|---|---|---|---|---|---|",
    ]
    for doc in docs:
        readings = (_get(doc, f"static interval {k}", "efficiency") for k in (2, 3, 4))
        static = [min(e, 1.0) for e in readings if e is not None]  # above 1.0 is noise
        adaptive = "fbcache skips all it can"
        if _row(doc, adaptive) is None and _row(doc, "deepcache interval 3") is not None:
            adaptive_cell = f"deepcache {_f(_get(doc, 'deepcache interval 3', 'efficiency'), '.3f')}"
            never_cell = "—"
        else:
            adaptive_cell = " / ".join(
                _f(_get(doc, p, "efficiency"), ".3f")
                for p in (
                    adaptive,
                    "diffusers FirstBlockCache skips all it can",
                    "cache-dit DBCache F1B0 skips all it can",
                )
            )
            never_cell = " / ".join(
                _f(_get(doc, p, "overhead_pct"), "+.1f", "%")
                for p in (
                    "fbcache never skips",
                    "diffusers FirstBlockCache never skips",
                    "cache-dit DBCache F1B0 never skips",
                )
            )
        kept = [r.get("kept") for r in doc["rows"] if r.get("compiled") and r.get("kept") is not None]
        overhead = _f(_get(doc, "always compute", "overhead_pct"), "+.2f", "%")
        lines.append(
            f"| {doc['arch']} ({doc['size']}) | {_f(_get(doc, 'no stepcache', 'step_ms'), '.1f', ' ms')} "
            f"| {overhead} "
            f"| {f'{min(static):.3f}–{max(static):.3f}' if static else '—'} | {adaptive_cell} | {never_cell} "
            f"| {' / '.join(_f(k, '.0%') for k in kept) or '—'} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--summary":
        print(summary([json.loads(Path(p).read_text()) for p in args[1:]]))
        return
    for path in map(Path, args):
        doc = json.loads(path.read_text())
        print(f"<!-- {path}: {doc['command']} ({doc['device']}, {doc['dtype']}) -->")
        print(table(doc))
        print()


if __name__ == "__main__":
    main()
