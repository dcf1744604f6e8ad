"""The tools on the user's own pipeline: ``bench``, ``compare`` and ``calibrate`` (``search`` is
``stepcache.search``). Each takes a pipeline object or spec (zoo key, diffusers folder,
``module:function``) and a ``Workload``; a zoo key alone uses the zoo's own defaults.

    stepcache.search(pipe, workload, speedup=3)
    stepcache.bench(pipe, workload, ["fora", "searched.json"])
    stepcache.compare(pipe, workload, peers=["diffusers"])
    stepcache.calibrate(pipe, workload, "magcache")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .policy import Policy


def _candidates(policies: Sequence[Any]) -> list[Any]:
    """Runs for preset names, policy files and Policy objects, checked before any work."""
    from .api import resolve_policy
    from .bench.harness import check_run_names, policy_candidate

    if isinstance(policies, (str, Policy, os.PathLike)):
        policies = [policies]
    cands = []
    for i, item in enumerate(policies):
        pol = resolve_policy(item)
        name = pol.name or (str(item) if isinstance(item, (str, os.PathLike)) else f"policy {i}")
        cands.append(policy_candidate(pol, name))
    if not cands:
        raise ValueError("policies: give at least one preset name, policy file or Policy")
    check_run_names(cands)
    return cands


def bench(
    model: Any,
    workload: Any = None,
    policies: Sequence[Any] = (),
    *,
    out_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    seeds: int | None = None,
    repeats: int = 5,
    guidance: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Measure ``policies`` against full compute on the workload's held-out seeds: speedup with
    its interval, FLOPs, PSNR/SSIM per image with intervals (and, on zoo models, the judges).
    With ``out_dir``, also writes result.json, samples and report.html there."""
    from .bench.harness import bench as measure

    return measure(
        model,
        _candidates(policies),
        out_dir,
        steps=steps,
        seeds=seeds,
        repeats=repeats,
        guidance=guidance,
        command=command,
        progress=progress,
        workload=workload,
    )


def compare(
    model: Any,
    workload: Any = None,
    *,
    peers: list[str] | None = None,
    policies: list[Policy] | None = None,
    sweep: list[tuple[str, dict[str, Any]]] | None = None,
    out_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    seeds: int | None = None,
    repeats: int = 5,
    guidance: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """stepcache's preset sweep (``sweep``: (preset, overrides) pairs, default every preset at two
    settings) and ``policies`` against the peers (default all) on the same workload."""
    from .bench.compare import compare as run

    return run(
        model,
        out_dir,
        peers=peers,
        policies=policies,
        sweep=sweep,
        steps=steps,
        seeds=seeds,
        repeats=repeats,
        guidance=guidance,
        command=command,
        progress=progress,
        workload=workload,
    )


def calibrate(
    model: Any,
    workload: Any,
    method: str,
    *,
    out: str | os.PathLike | None = None,
    samples: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    command: str | None = None,
    **overrides: Any,
) -> Policy:
    """``method``'s coefficients (linear-ag, magcache, teacache, hyca) or threshold (fbcache,
    dbcache: ``methods.threshold``) fitted on full-compute runs of
    the workload's calibration seeds (on a zoo model without a workload: ``samples`` seeds, 32 by
    default, at ``steps`` and ``guidance``); the returned policy records where they came from.
    ``out`` also saves it."""
    from .bench.harness import batch_for, resolve
    from .calibration import calibrate as fit
    from .calibration import check_calibrate_args
    from .pipelines import load_pipeline

    wl = resolve(model, workload, steps, guidance, None)
    check_calibrate_args(method, lambda: None, overrides)
    if wl is not None and samples is not None:
        raise ValueError("samples: the workload's calib_seeds say how many; not both")
    if out is not None:
        from ._io import check_out_file

        check_out_file(out)
    target = load_pipeline(model)
    batch = batch_for(target, wl, "calib", samples or 32, steps, guidance)
    pol = fit(method, target.pipe, lambda: batch.generate(target.pipe), **overrides)
    meta: dict[str, Any] = {
        "model": target.name,
        "scheduler": type(target.pipe.scheduler).__name__ if hasattr(target.pipe, "scheduler") else None,
        "steps": batch.steps,
        "guidance_scale": batch.guidance,
        "calibration": {"seeds": [batch.seeds[0], batch.seeds[-1]], "samples": len(batch.seeds)},
        **({"workload": wl.to_dict()} if wl is not None else {}),
    }
    if command is not None:
        meta["found_by"] = command
    pol = Policy.from_dict({**pol.to_dict(), "name": f"{method} ({target.name})"[:200], "meta": meta})
    if out is not None:
        pol.save(Path(out))
    return pol
