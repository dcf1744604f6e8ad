"""HyCa at the searched step masks (block level, fn=bn=0) beside the searched step-level policy
(the band policies of benchmarks/results/search-stride-MODEL)."""

import json
import sys

import stepcache
from stepcache import presets
from stepcache.policy import Policy, compose

m = sys.argv[1]
searched = json.load(open(f"benchmarks/results/search-stride-{m}/result.json"))["runs"]
for x in ("1.5", "2", "3"):
    src = next(r["params"] for r in searched if r["name"].endswith(f"speedup{x}"))
    mask = src["rules"]["step"]["mask"]
    guidance = src["rules"].get("guidance")
    out = f"runs/hyca/{m}-cal-mask{x}.json"
    try:
        cal = json.load(open(out))
    except FileNotFoundError:
        cal = stepcache.calibrate(m, None, "hyca", mask=mask, out=out).to_dict()
    solvers = cal["rules"]["block"]["solvers"]
    variants = {"calibrated": solvers, "online": None, "all-damped": [4] * len(solvers)}
    for tag, s in variants.items():
        parts = [presets.get("hyca", mask=mask, solvers=s)]
        if guidance:
            parts.append(Policy.from_dict({"schema": src["schema"], "rules": {"guidance": guidance}}))
        pol = compose(*parts, name=f"hyca {tag} at searched {x}x mask") if len(parts) > 1 else parts[0]
        d = pol.to_dict()
        d["name"] = f"hyca {tag} at searched {x}x mask"
        json.dump(d, open(f"runs/hyca/mpol-{m}-{x}-{tag}.json", "w"))
    json.dump({**src, "name": f"searched step-level {x}x"}, open(f"runs/hyca/mpol-{m}-{x}-step.json", "w"))
