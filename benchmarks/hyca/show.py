"""Print a bench result.json as one line per run: FLOP speedup, PSNR and its interval."""

import json
import sys

with open(sys.argv[1]) as f:
    runs = json.load(f)["runs"]
for r in sorted(runs, key=lambda r: r["name"]):
    psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
    ci = r.get("psnr_ci") or [None, None]
    interval = "" if ci[0] is None else f"({ci[0]:.2f}-{ci[1]:.2f})"
    print(f"{r['name']:45s} {r.get('flop_ideal') or 1:.2f}x FLOPs  {psnr} dB {interval}")
