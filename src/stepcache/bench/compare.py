"""``compare``: stepcache's presets and the peers' settings measured in one process on one model.

The stepcache side is a sweep of every preset at its default and at more aggressive settings
(plus any policy files the user passes, e.g. searched ones); the peer side is
``bench.peers.peer_runs``. A run that cannot work on the model is reported, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import _limits as lim
from .. import presets
from ..methods import methods
from ..policy import Policy
from .harness import (
    BENCH_FILES,
    Candidate,
    bench,
    check_args,
    check_out_dir,
    peer_candidate,
    policy_candidate,
    unsupported,
)


def default_sweep() -> list[tuple[str, dict[str, Any]]]:
    """(preset, overrides) for every setting the methods' files ask ``compare`` to run
    (``Method.sweep``): the default and faster settings of each, and gentler ones for the low
    bands, since the peers' documented grids start at 1.1x."""
    return [(name, dict(o)) for name, m in methods().items() for o in m.sweep]


def sweep_name(preset: str, overrides: dict[str, Any]) -> str:
    if not overrides:
        return preset
    return preset + " " + " ".join(f"{k}={v}" for k, v in overrides.items())


def stepcache_candidates(
    pipe: Any, sweep: list[tuple[str, dict[str, Any]]] | None = None, policies: list[Policy] | None = None
) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Candidates for the sweep and the given policies; those the model does not support are
    returned as unavailable entries instead."""
    cands, unavailable = [], []
    items = [
        (sweep_name(p, o), presets.get(p, **o)) for p, o in (default_sweep() if sweep is None else sweep)
    ]
    items += [(pol.name or f"policy {i}", pol) for i, pol in enumerate(policies or [])]
    for name, pol in items:
        cand = policy_candidate(pol, name)
        reason = unsupported(pipe, cand)
        if reason is None:
            cands.append(cand)
        else:
            unavailable.append({"name": name, "kind": "stepcache", "reason": reason})
    return cands, unavailable


def compare(
    model: Any,
    out_dir: str | os.PathLike | None,
    peers: list[str] | None = None,
    policies: list[Policy] | None = None,
    sweep: list[tuple[str, dict[str, Any]]] | None = None,
    steps: int | None = None,
    seeds: int | None = None,
    repeats: int = 5,
    guidance: float | None = None,
    command: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    workload: Any = None,
    tune_peers: float | None = None,
    calib_seeds: int = 16,
) -> dict[str, Any]:
    """stepcache's sweep (and ``policies``) vs the named peers on ``model`` (a zoo key, a pipeline
    spec or object, with ``workload`` outside the zoo; see ``bench``).

    Each peer runs its documented settings; with ``tune_peers`` (a budget in full-generation
    equivalents, what ``stepcache.search`` gets per target) each peer method is also tuned for
    every FLOP band on the calibration seeds (``bench.tune``) and its winners measured here."""
    from ..pipelines import load_pipeline
    from .harness import batch_for, resolve
    from .peers import PEERS, Unavailable, peer_methods, peer_runs

    peers = list(PEERS) if peers is None else peers
    try:
        peer_methods(peers)  # an unknown peer or PEER:METHOD, before the model loads
    except ValueError as e:
        raise ValueError(f"peers: {e}") from None
    if tune_peers is not None:
        lim.check_float("tune_peers", tune_peers, 0.0, lim.MAX_TUNE_BUDGET, above=True)
    if tune_peers is not None and not peers:
        raise ValueError("tune_peers: no peer to tune; name one with peers=")
    wl = resolve(model, workload, steps, guidance, seeds)
    check_args(model, out_dir, steps, seeds or 16, repeats, guidance)
    if out_dir is not None:  # the peers' setup loads the model: check before it
        check_out_dir(out_dir, BENCH_FILES)
    taken = {sweep_name(p, o) for p, o in (default_sweep() if sweep is None else sweep)}
    for i, pol in enumerate(policies or []):  # a clash would otherwise surface after the model loads
        name = pol.name or f"policy {i}"
        if name in taken:
            raise ValueError(
                f"policy {i}: its name {pol.name!r} is also a run of the sweep or another policy; rename it"
            )
        taken.add(name)
    target = load_pipeline(model)
    pipe = target.pipe
    if wl is not None:
        wl.check_pipeline(pipe)
    cands, unavailable = stepcache_candidates(pipe, sweep, policies)
    runs = peer_runs(pipe, peers) if peers else []
    if peers and tune_peers is not None:
        from .bands import BANDS
        from .tune import Calibration, tuned_runs

        cal = Calibration.measure(pipe, batch_for(target, wl, "calib", calib_seeds, steps, guidance))
        runs += tuned_runs(pipe, peer_methods(peers), cal, BANDS, tune_peers, progress=progress)[0]
    for run in runs:
        if isinstance(run, Unavailable):
            unavailable.append({"name": run.name, "kind": "peer", "peer": run.peer, "reason": run.reason})
        else:
            cands.append(peer_candidate(run))
    return bench(
        target,
        cands,
        out_dir,
        steps=steps,
        seeds=seeds,
        repeats=repeats,
        guidance=guidance,
        unavailable=unavailable,
        command=command,
        progress=progress,
        workload=wl,
    )
