"""The policies of benchmarks/hyca/run.sh: HyCa (calibrated, online) and each single solver of its
pool on every channel, at intervals 2, 3 and 4 (equal compute per interval)."""

import json
import sys

from stepcache import presets
from stepcache.methods.block.hyca import SOLVERS


def save(model: str, interval: int, tag: str, solvers: list[int] | None) -> None:
    policy = presets.get("hyca", interval=interval, solvers=solvers).to_dict()
    policy["name"] = f"hyca {tag} interval={interval}"
    with open(f"runs/hyca/pol-{model}-i{interval}-{tag}.json", "w") as f:
        json.dump(policy, f)


model = sys.argv[1]
for interval in (2, 3, 4):
    with open(f"runs/hyca/{model}-cal-i{interval}.json") as f:
        fitted = json.load(f)["rules"]["block"]["solvers"]
    save(model, interval, "calibrated", fitted)
    save(model, interval, "online", None)
    for k, name in enumerate(SOLVERS):
        save(model, interval, f"all-{name}", [k] * len(fitted))
