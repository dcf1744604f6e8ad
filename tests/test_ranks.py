"""Rank-consistent decisions: two processes (gloo, CPU) run the same denoiser on different
"shards" (different inputs, as context parallelism gives each rank its own tokens). Without
agreement their data-dependent rules decide differently (a deadlock in the next collective of a
real split model); with it, every call's decision is the same on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

import stepcache
from stepcache.runtime.ranks import agreement_for

WORKER = """
import json, sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[4])
import tiny
import stepcache

rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.manual_seed(0)
model = tiny.make("dit")
result = {}
rules = {
    "fbcache": {"block": {"method": "fbcache", "threshold": 0.3}},
    "magcache": {"step": {"method": "magcache", "threshold": 0.05, "warmup": 1}},
}
policies = {name: {"schema": "stepcache.policy/1", "rules": r} for name, r in rules.items()}
split = SimpleNamespace(context_parallel_config=SimpleNamespace(_flattened_mesh=None))
for name, policy in policies.items():
    for mode, group in (("off", False), ("world", "world"), ("auto", None)):
        if mode == "auto":  # what diffusers' enable_parallelism leaves on a split model
            model._parallel_config = split
        handle = stepcache.enable(model, policy, group=group)
        with handle.generation(num_steps=10):
            tiny.sample("dit", model, batch=2, steps=10, seed=100 + 7 * rank)
        stats = handle.stats()
        result[f"{name}/{mode}"] = {
            "rows": stats["row_actions"],
            "reductions": 0 if handle.agreement is None else handle.agreement.reductions,
        }
        stepcache.disable(model)
        model.__dict__.pop("_parallel_config", None)
dist.barrier()
dist.destroy_process_group()
with open(out, "w") as f:
    json.dump(result, f)
"""


def test_every_rank_takes_the_same_decision(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tests = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(rank), init, str(tmp_path / f"rank{rank}.json"), tests],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for name in ("fbcache", "magcache"):
        # The shards disagree on their own: the test would catch a missing reduction.
        assert r0[f"{name}/off"]["rows"] != r1[f"{name}/off"]["rows"], name
        assert r0[f"{name}/off"]["reductions"] == 0
        for mode in ("world", "auto"):
            a, b = r0[f"{name}/{mode}"], r1[f"{name}/{mode}"]
            assert a["rows"] == b["rows"], (name, mode)
            assert a["reductions"] == b["reductions"] >= 10  # one per call at least
            # A row computes when either rank wanted it: never fewer than either alone.
            for mine in (r0, r1):
                alone = "".join(mine[f"{name}/off"]["rows"])
                agreed = "".join(a["rows"])
                assert agreed.count("C") >= alone.count("C")


def test_no_agreement_without_a_split_model_and_bad_groups_are_refused() -> None:
    model = tiny.make("dit")
    assert agreement_for(model, None) is None  # one process, no parallel config
    assert agreement_for(model, False) is None
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        stepcache.enable(model, "fbcache", group="world")
    for bad in ("everyone", True, 3):
        with pytest.raises(ValueError, match="group: expected a torch.distributed process group"):
            stepcache.enable(model, "fbcache", group=bad)
    assert not hasattr(model.forward, "__self__") or model.forward.__self__ is model  # nothing attached
