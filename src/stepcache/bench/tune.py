"""Peers tuned the way stepcache tunes itself.

For each peer method and each speed band, a gradient-free search (Optuna TPE, its first trials
the method's documented settings) varies the method's own knobs (``PeerMethod.space``) on the
calibration seeds and keeps the configuration with the best calibration PSNR among those at least
``band`` times below full compute's FLOPs. The budget is counted as stepcache's search counts
its own: in full-generation equivalents of the calibration batch, each trial costing its FLOP
fraction. FLOPs, not wall-clock, decide the band, so the same command tunes to the same
configuration. The winners are then measured on the held-out seeds beside everything else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics import capped_psnr_per_image
from .harness import Batch, _flops_and_images
from .peers import Knob, PeerMethod, PeerRun, Unavailable

STALE_PROPOSALS = 25  # proposals in a row that repeat a tried (or refused) configuration end it
SEEDED = 6  # documented settings tried first, spread over the documented sweep


@dataclass
class Calibration:
    """The calibration batch and full compute's images and FLOPs on it, measured once."""

    batch: Batch
    reference: np.ndarray = field(repr=False)
    flops: float

    @classmethod
    def measure(cls, pipe: Any, batch: Batch) -> Calibration:
        batch.generate(pipe)  # first-call allocations stay out of the count
        images, flops = _flops_and_images(lambda: batch.generate(pipe))
        return cls(batch, images, flops)


@dataclass
class Trial:
    config: dict[str, Any]
    flop_speedup: float
    psnr: float
    cost: float  # full-generation equivalents
    error: str | None = None


@dataclass
class Tuned:
    """One method's tuning for one band: the chosen configuration (None when no trial reached the
    band), its calibration numbers, and what the tuning spent."""

    method: PeerMethod
    band: float
    budget: float
    config: dict[str, Any] | None
    psnr: float
    flop_speedup: float
    used: float
    trials: list[Trial]

    def record(self) -> dict[str, Any]:
        return {
            "band": self.band,
            "budget": self.budget,
            "used": round(self.used, 4),
            "trials": len(self.trials),
            "calib_psnr": self.psnr,
            "calib_flop_speedup": self.flop_speedup,
        }


def evaluate(pipe: Any, method: PeerMethod, config: dict[str, Any], cal: Calibration) -> Trial:
    """One configuration on the calibration batch: its FLOP speedup, capped mean PSNR and cost.
    A configuration the method or the model refuses (at attach or while generating) is a trial
    with its error, costing what it ran."""
    try:
        run = method.run(pipe, config)
        run.attach(pipe)
    except Exception as e:  # a knob combination the library refuses
        return Trial(config, 0.0, -math.inf, 0.0, f"{type(e).__name__}: {e}")
    try:
        with run.generation(pipe):
            images, flops = _flops_and_images(lambda: cal.batch.generate(pipe))
    except Exception as e:
        return Trial(config, 0.0, -math.inf, 1.0, f"{type(e).__name__}: {e}")
    finally:
        run.detach(pipe)
    psnr = float(capped_psnr_per_image(images, cal.reference).mean())
    return Trial(config, cal.flops / flops if flops > 0 else math.inf, psnr, flops / cal.flops)


def _score(trial: Trial, band: float) -> float:
    """What TPE maximises: PSNR in the band; below it, a score under every in-band one that rises
    as the shortfall shrinks, so proposals move toward the band before any reached it."""
    if trial.error is not None:
        return -1e4
    if trial.flop_speedup >= band - 1e-9:
        return trial.psnr
    return -100.0 - 1000.0 * (band / max(trial.flop_speedup, 1e-9) - 1.0)


def tune(
    pipe: Any,
    method: PeerMethod,
    cal: Calibration,
    band: float,
    budget: float,
    seed: int = 0,
    known: dict[str, Trial] | None = None,
) -> Tuned:
    """Tune ``method`` for ``band`` with ``budget`` full-generation equivalents of new trials.

    ``known`` holds trials the method already paid for (its tuning for other bands): the study
    starts from them at no cost, and new trials are added to it. Without them, the documented
    sweep is tried first. A trial starts while the budget left covers one at the band's edge, so
    the spend can pass the budget by less than one generation (recorded as ``used``).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    known = {} if known is None else known
    base = method.documented(pipe)
    knobs = method.space(pipe)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for trial in known.values():
        _add_known(study, knobs, trial, band)
    for overrides in _spread(method.sweep, SEEDED):  # as our search starts from its planner's seeds
        config = {**base, **overrides}
        if json.dumps(config, sort_keys=True) not in known:
            study.enqueue_trial({k.name: _as_param(k, config[k.name]) for k in knobs if k.name in config})
    trials: list[Trial] = []
    used, stale = 0.0, 0
    while used + 1.0 / band <= budget + 1e-9 and stale < STALE_PROPOSALS:
        ask = study.ask()
        config = {**base, **{k.name: k.suggest(ask) for k in knobs}}
        key = json.dumps(config, sort_keys=True)
        if key in known:  # a repeat costs nothing and teaches nothing new
            study.tell(ask, _score(known[key], band))
            stale += 1
            continue
        trial = evaluate(pipe, method, config, cal)
        known[key] = trial
        trials.append(trial)
        used += trial.cost
        stale = stale + 1 if trial.cost == 0 else 0  # refused before running: no progress either
        study.tell(ask, _score(trial, band))
    ok = [t for t in known.values() if t.error is None and t.flop_speedup >= band - 1e-9]
    best = max(ok, key=lambda t: t.psnr) if ok else None
    return Tuned(
        method,
        band,
        budget,
        best.config if best else None,
        best.psnr if best else -math.inf,
        best.flop_speedup if best else 0.0,
        used,
        trials,
    )


def _add_known(study: Any, knobs: tuple[Knob, ...], trial: Trial, band: float) -> None:
    """A trial evaluated before, told to the study with its score for this band."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists: dict[str, Any] = {}
    for k in knobs:
        if k.choices:
            dists[k.name] = CategoricalDistribution([json.dumps(c) for c in k.choices])
        elif k.integer:
            dists[k.name] = IntDistribution(int(k.low), int(k.high), log=k.log)
        else:
            dists[k.name] = FloatDistribution(k.low, k.high, log=k.log)
    params = {k.name: _as_param(k, trial.config[k.name]) for k in knobs}
    try:
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, value=_score(trial, band))
        )
    except ValueError:  # a documented value outside the tuning range: nothing to learn from
        pass


def _spread(items: tuple[Any, ...], count: int) -> list[Any]:
    """At most ``count`` of ``items``, evenly spaced, first and last included."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _as_param(knob: Knob, value: Any) -> Any:
    """A configuration value as the trial parameter ``Knob.suggest`` reads back."""
    return json.dumps(value) if knob.choices else value


def tuned_runs(
    pipe: Any,
    methods: list[PeerMethod],
    cal: Calibration,
    bands: tuple[float, ...],
    budget: float,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[PeerRun | Unavailable], list[Tuned]]:
    """Every available method tuned for every band; one run per distinct chosen configuration,
    named by the bands it was chosen for, its tuning recorded in its parameters."""
    runs: list[PeerRun | Unavailable] = []
    tunings: list[Tuned] = []
    for i, method in enumerate(methods):
        reason = method.why_not(pipe)
        if reason is not None:
            runs.append(Unavailable(f"{method.label} tuned", method.peer, reason))
            continue
        chosen: dict[str, list[Tuned]] = {}
        known: dict[str, Trial] = {}
        for band in bands:
            if progress is not None:
                progress(
                    f"tuning {method.label} for >= {band:g}x",
                    i * len(bands) + bands.index(band),
                    len(methods) * len(bands),
                )
            t = tune(pipe, method, cal, band, budget, seed, known)
            tunings.append(t)
            if t.config is not None:
                chosen.setdefault(json.dumps(t.config, sort_keys=True), []).append(t)
        for group in chosen.values():
            edges = "/".join(f"{t.band:g}" for t in group)
            name = f"{method.label} tuned >={edges}x"
            runs.append(method.run(pipe, group[0].config, name, tuned=[t.record() for t in group]))
        if not chosen:
            bands_txt = ", ".join(f"{b:g}x" for b in bands)
            runs.append(
                Unavailable(
                    f"{method.label} tuned", method.peer, f"no setting reached {bands_txt} in its budget"
                )
            )
    return runs, tunings
