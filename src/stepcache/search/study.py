"""Target-driven policy search: "3x faster at the best PSNR" or "the fastest at PSNR >= 30 dB".

1. Record full-compute reference trajectories on the calibration seeds (cost: 1 generation).
2. Count each action's FLOPs once (full step, estimated step, conditional-only step, partial
   step): a deterministic cost model that predicts a candidate's work from its per-step actions,
   so the same command on the same seeds chooses the same policy on a busy or an idle machine.
   Wall-clock is measured on the held-out seeds and reported beside it, never used to choose.
3. Search the joint space of ``space.Candidate`` with an Optuna sampler, seeded with the
   planner's answers, or with the planner alone, or with an AutoDiffusion-style evolutionary
   baseline. A candidate's evaluation costs its computed fraction of one calibration generation;
   the budget is counted in those full-generation equivalents.
4. Score the chosen policy on held-out seeds (disjoint from calibration), and the *limit*: the
   planner given the held-out seeds' own trajectories (an oracle), at the same held-out PSNR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import presets, zoo
from .._limits import MAX_BUDGET
from ..api import disable, enable
from ..bench.harness import EVAL_SEED_BASE, Judge, Workload, _flops, _timed, adherence, make_workload
from ..errors import UnsupportedModelError
from ..metrics import bootstrap_ci, psnr_per_image, ssim_per_image
from ..policy import Policy
from .planner import SegmentErrors, plan
from .space import CFG_MODES, Candidate
from .trajectory import record

SEARCHERS = ("tpe", "nsga2", "cmaes", "random", "planner", "evolution")
PSNR_CAP = 100.0  # dB given to an image identical to its reference, so means stay finite


class SearchError(ValueError):
    """A search request that cannot be carried out; the message names the argument."""


@dataclass(frozen=True)
class Target:
    speedup: float | None = None
    min_psnr: float | None = None
    min_adherence: float | None = None  # a constraint on top: the judge's share of faithful samples

    def check(self) -> None:
        if (self.speedup is None) == (self.min_psnr is None):
            raise SearchError("target: give exactly one of speedup or min_psnr")
        floor = self.min_adherence
        if floor is not None and (
            isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1
        ):
            raise SearchError(f"min_adherence: must be a fraction in [0, 1], got {self.min_adherence!r}")
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 1):
            raise SearchError(f"speedup: must be a finite number > 1, got {self.speedup}")
        if self.min_psnr is not None and not (math.isfinite(self.min_psnr) and self.min_psnr > 0):
            raise SearchError(f"min_psnr: must be a positive number of dB, got {self.min_psnr}")

    def as_dict(self) -> dict[str, float]:
        out = {"speedup": self.speedup} if self.speedup is not None else {"min_psnr_db": self.min_psnr}
        if self.min_adherence is not None:
            out["min_adherence"] = self.min_adherence
        return out

    def slug(self) -> str:
        base = f"speedup{self.speedup:g}" if self.speedup is not None else f"psnr{self.min_psnr:g}"
        return base if self.min_adherence is None else f"{base}-adh{self.min_adherence:g}"


def policy_key(policy: Policy) -> str:
    """Identifies what a policy computes, whatever its name or meta."""
    return str(sorted(policy.to_dict()["rules"].items()))


class Evaluator:
    """A seed set's reference (trajectory and images) and the evaluation of candidate policies."""

    def __init__(self, pipe: Any, work: Workload, reference: np.ndarray | None = None):
        """Records the reference trajectory, or, given ``reference`` images (a remote worker
        that only scores candidates), takes them as they are."""
        self.pipe, self.work = pipe, work
        self.traj = record(pipe, lambda: work.generate(pipe)) if reference is None else None
        self.reference = self.traj.images if self.traj is not None else reference
        self.cfg = work.guidance > 1.0
        self._errors = {order: SegmentErrors(self.traj, order) for order in (0, 1)} if self.traj else {}
        self._masks: dict[tuple[int, int], list[bool]] = {}
        self._cache: dict[str, dict[str, Any]] = {}
        self.reference_adherence = adherence(work.model, self.reference, work.captions)

    @property
    def num_steps(self) -> int:
        return self.traj.num_steps

    def mask(self, computed: int, order: int) -> list[bool]:
        """The planner's schedule for ``computed`` steps (exact for order <= 1, reused above)."""
        key = (computed, min(order, 1))
        if key not in self._masks:
            self._masks[key] = plan(self._errors[key[1]], self.num_steps, computed)[0]
        return self._masks[key]

    def evaluate(self, policy: Policy) -> dict[str, Any]:
        """Fidelity of ``policy`` on this seed set; ``cost`` is the fraction of network rows it
        ran (0 when the same policy was evaluated before: its result is reused)."""
        key = policy_key(policy)
        if key in self._cache:
            return {**self._cache[key], "cost": 0.0}
        handle = enable(self.pipe, policy)
        try:
            images = self.work.generate(self.pipe)
            stats = handle.stats()
        finally:
            disable(self.pipe)
        psnr = psnr_per_image(images, self.reference)
        letters = "".join(stats["row_actions"])
        result = {
            "psnr": float(np.minimum(psnr, PSNR_CAP).mean()),
            "psnr_ci": list(bootstrap_ci(np.minimum(psnr, PSNR_CAP))),
            "ssim": float(ssim_per_image(images, self.reference).mean()),
            "actions": "".join(stats["actions"]),
            "row_actions": list(stats["row_actions"]),
            # Partial rows ran the span's ends; counted as half a row, a rough share.
            "cost": (letters.count("C") + 0.5 * letters.count("P")) / len(letters),
            "adherence": adherence(self.work.model, images, self.work.captions),
            "images": images,
        }
        self._cache[key] = result
        return result


@dataclass(frozen=True)
class CostModel:
    """Work of a generation from its per-step actions: ``full`` minus what each estimated step
    (E) and each conditional-only step (G) saves, in FLOPs (torch's counter: matrix products,
    convolutions and attention), counted once per action. Deterministic, unlike timings on a
    shared machine; an estimated step's elementwise arithmetic counts as free."""

    full: float
    save_estimated: float
    save_cond_only: float
    save_partial: float = 0.0  # per step whose every row skips all blocks but the first
    num_blocks: int = 0

    @classmethod
    def calibrate(cls, ev: Evaluator, blocks: bool = False) -> CostModel:
        n = ev.num_steps
        only_first = [True] + [False] * (n - 1)

        def work(policy: Policy | None) -> float:
            if policy is not None:
                enable(ev.pipe, policy)
            try:
                return _flops(lambda: ev.work.generate(ev.pipe))
            finally:
                disable(ev.pipe)

        full = work(None)
        estimated = work(Candidate(1, 1).policy(only_first, cfg=False))
        save_g = 0.0
        if ev.cfg and n > 1:
            # step 0 with guidance (full_until is at least 1), the other n - 1 conditional only
            cond_only = work(Candidate(n, 0, cfg_full=0.0, cfg_mode="cond-only").policy([True] * n, cfg=True))
            save_g = max(0.0, (full - cond_only) / (n - 1))
        save_e = max(0.0, (full - estimated) / max(1, n - 1))
        save_p, num_blocks = 0.0, _num_blocks(ev.pipe) if blocks else 0
        if num_blocks >= 2 and n > 1:
            skip_middle = presets.get("dbcache", fn=1, bn=0, threshold=1e9, max_consecutive=100_000, warmup=1)
            save_p = max(0.0, (full - work(skip_middle)) / (n - 1))
        return cls(
            full=full,
            save_estimated=save_e,
            save_cond_only=save_g,
            save_partial=save_p,
            num_blocks=num_blocks,
        )

    def speedup(self, actions: str) -> float:
        latency = (
            self.full - actions.count("E") * self.save_estimated - actions.count("G") * self.save_cond_only
        )
        return self.full / max(latency, 1e-9)

    def speedup_rows(self, row_actions: list[str], middle_fraction: float) -> float:
        """Speedup from what each row did per step (as ``stats()["row_actions"]`` reports it):
        estimated steps, left-out unconditional rows, and rows whose middle blocks were skipped."""
        latency = self.full
        for rows in row_actions:
            if set(rows) == {"E"}:
                latency -= self.save_estimated
                continue
            latency -= self.save_cond_only * min(1.0, 2 * rows.count("G") / len(rows))
            latency -= self.save_partial * middle_fraction * rows.count("P") / len(rows)
        return self.full / max(latency, 1e-9)

    def optimistic(self, actions: str, middle_fraction: float) -> float:
        """Upper bound before running: every computed step after the first also partial."""
        partial = sum(1 for i, a in enumerate(actions) if a in "CG" and i > 0)
        latency = self.full / self.speedup(actions) - partial * self.save_partial * middle_fraction
        return self.full / max(latency, 1e-9)


def _num_blocks(pipe: Any) -> int:
    """Blocks in the denoiser's stack; 0 (no block level to search) for a model without one."""
    from ..adapters import adapter_for, find_denoiser

    try:
        return len(adapter_for(find_denoiser(pipe)).blocks() or [])
    except UnsupportedModelError:
        return 0


def _pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from ..bench.report import pareto_front

    front = pareto_front([(p["speedup"], p["psnr"]) for p in points])
    return [points[i] for i in front]


class _Run:
    """One search: the evaluator, the cost model, the budget, and every evaluated candidate."""

    def __init__(
        self,
        ev: Evaluator,
        cost: CostModel,
        target: Target,
        budget: float,
        used: float,
        progress: Callable[[float, float, str], None],
    ):
        self.ev, self.cost, self.target, self.budget, self.used = ev, cost, target, budget, used
        self.progress = progress
        self.evaluated: list[dict[str, Any]] = []
        self.pool: Any = None  # a remote pool (``remote.RayPool``), or None: evaluate here
        # Results by policy_key, without images: a policy seen before (in this process or in the
        # resumed part of a study) costs nothing, wherever it would run.
        self.known: dict[str, dict[str, Any]] = {}

    def predict(self, cand: Candidate) -> tuple[list[bool], str, float]:
        """Mask, step actions and predicted speedup; with a block rule, whose partial steps depend
        on the data, the speedup is an upper bound and the evaluation gives the real one."""
        mask = self.ev.mask(cand.computed, cand.order)
        actions = cand.actions(mask, self.ev.cfg)
        fraction = cand.middle_fraction(self.cost.num_blocks)
        if fraction > 0:
            return mask, actions, self.cost.optimistic(actions, fraction)
        return mask, actions, self.cost.speedup(actions)

    def feasible_speed(self, speed: float) -> bool:
        return self.target.speedup is None or speed >= self.target.speedup - 1e-9

    @staticmethod
    def eval_cost(actions: str) -> float:
        """What evaluating these step actions costs, in generations: a conditional-only step (G)
        runs half of the batch's rows."""
        return (actions.count("C") + 0.5 * actions.count("G")) / len(actions)

    def affordable(self, actions: str) -> bool:
        return self.used + self.eval_cost(actions) <= self.budget + 1e-9

    def fastest_settings(self) -> dict[str, Any]:
        """The guidance and block settings that save the most time per computed step."""
        fastest: dict[str, Any] = {"cfg_full": 0.0, "cfg_mode": "cond-only"} if self.ev.cfg else {}
        if self.cost.num_blocks >= 2:
            fastest["block_fn"] = 1
        return fastest

    def run_many(self, cands: list[Candidate]) -> list[dict[str, Any]]:
        """Evaluate candidates (on the pool's workers, in parallel when it has several)."""
        prepared = [(cand, *self.predict(cand)) for cand in cands]
        policies = [cand.policy(mask, self.ev.cfg) for cand, mask, _, _ in prepared]
        keys = [policy_key(p) for p in policies]
        fresh = list(dict.fromkeys(k for k in keys if k not in self.known))
        todo = [policies[keys.index(k)] for k in fresh]
        results = self.pool.evaluate(todo) if self.pool is not None else [self.ev.evaluate(p) for p in todo]
        for k, res in zip(fresh, results, strict=True):
            self.known[k] = {name: v for name, v in res.items() if name != "images"}
        unpaid = set(fresh)  # each fresh policy pays once, even when a batch holds it twice
        points = []
        for (cand, mask, _, _), key in zip(prepared, keys, strict=True):
            res = {**self.known[key], "cost": self.known[key]["cost"] if key in unpaid else 0.0}
            unpaid.discard(key)
            self.used += res["cost"]
            speed = self.cost.speedup_rows(res["row_actions"], cand.middle_fraction(self.cost.num_blocks))
            point = {
                "candidate": cand.as_dict(),
                "psnr": res["psnr"],
                "speedup": speed,
                "actions": res["actions"],
                "mask": mask,
                "cost": res["cost"],
                "row_actions": res["row_actions"],
                "adherence": res.get("adherence"),
            }
            self.evaluated.append(point)
            points.append(point)
        best = self.best()
        self.progress(
            self.used, self.budget, f"best {best['psnr']:.1f} dB at {best['speedup']:.2f}x" if best else ""
        )
        return points

    def remember(self, point: dict[str, Any]) -> None:
        """A point evaluated before (a resumed study's): counted, and free when proposed again."""
        self.evaluated.append(point)
        self.used += point["cost"]
        if point["row_actions"]:  # stored since the study kept them; older points pay again
            policy = Candidate(**point["candidate"]).policy(point["mask"], self.ev.cfg)
            self.known.setdefault(policy_key(policy), point)

    def score(self, point: dict[str, Any]) -> float:
        """One number to maximise: PSNR for a speed target; predicted speedup for a PSNR target
        (negative, by the PSNR shortfall, when the PSNR target is missed)."""
        if self.target.speedup is not None:  # too slow once measured: ranked below every fast one
            return point["psnr"] if self.meets(point) else -100.0 + point["speedup"]
        shortfall = self.target.min_psnr - point["psnr"]
        return point["speedup"] if shortfall <= 0 else -shortfall

    def meets(self, point: dict[str, Any]) -> bool:
        floor = self.target.min_adherence
        if floor is not None and (point.get("adherence") is None or point["adherence"] < floor - 1e-9):
            return False
        if self.target.speedup is not None:
            return self.feasible_speed(point["speedup"])
        return point["psnr"] >= self.target.min_psnr

    def best(self) -> dict[str, Any] | None:
        ok = [p for p in self.evaluated if self.meets(p)]
        return max(ok, key=self.score) if ok else None

    def largest_feasible(self, order: int, **cfg: Any) -> Candidate | None:
        """The candidate with the most computed steps that still meets the speed target."""
        for k in range(self.ev.num_steps, 0, -1):
            cand = Candidate(k, order, **cfg)
            if self.feasible_speed(self.predict(cand)[2]):
                return cand
        return None

    def planner_seeds(self) -> list[Candidate]:
        n = self.ev.num_steps
        cfgs: list[dict[str, Any]] = [{}]
        if self.ev.cfg:
            cfgs.append({"cfg_full": 0.3, "cfg_mode": "estimated", "cfg_interval": 2})
        seeds: list[Candidate] = []
        if self.target.min_psnr is not None:  # no speed to aim at: a safe and a bolder schedule
            for k in sorted({min(n, max(2, (3 * n) // 4)), min(n, max(2, n // 2))}, reverse=True):
                seeds += [Candidate(k, order) for order in (0, 1) if Candidate(k, order) not in seeds]
            return seeds
        for order in (0, 1):
            for cfg in cfgs:
                cand = self.largest_feasible(order, **cfg)
                if cand is not None and cand not in seeds:
                    seeds.append(cand)
        return seeds


def _suggest(trial: Any, k_max: int, cfg: bool, num_blocks: int) -> Candidate:
    kw: dict[str, Any] = {
        "order": trial.suggest_int("order", 0, 2),
        "computed": trial.suggest_int("computed", 1, k_max),
    }
    if cfg:
        kw["cfg_full"] = trial.suggest_float("cfg_full", 0.0, 1.0)
        kw["cfg_mode"] = trial.suggest_categorical("cfg_mode", list(CFG_MODES))
        kw["cfg_interval"] = trial.suggest_int("cfg_interval", 1, 6)
    if num_blocks >= 2:  # the block level: none (0), or dbcache's span and threshold
        kw["block_fn"] = trial.suggest_int("block_fn", 0, min(2, num_blocks - 1))
        if kw["block_fn"] > 0:
            kw["block_bn"] = trial.suggest_int("block_bn", 0, 1)
            kw["block_threshold"] = trial.suggest_float("block_threshold", 0.03, 0.5, log=True)
    return Candidate(**kw)


def _params(cand: Candidate, cfg: bool, num_blocks: int) -> dict[str, Any]:
    d: dict[str, Any] = {"order": cand.order, "computed": cand.computed}
    if cfg:
        d.update(cfg_full=cand.cfg_full, cfg_mode=cand.cfg_mode, cfg_interval=cand.cfg_interval)
    if num_blocks >= 2:
        d["block_fn"] = cand.block_fn
        if cand.block_fn > 0:
            d.update(block_bn=cand.block_bn, block_threshold=cand.block_threshold)
    return d


def _sampler_at(searcher: str, seed: int) -> Callable[[int], Any]:
    """The sampler that makes the proposal at position ``at`` of a study's sequence, seeded from
    (seed, at): what it proposes depends on the study's finished trials only, never on how many
    processes asked before, so a resumed study proposes what the uninterrupted one would have.
    TPE, NSGA-II and random sampling read only COMPLETE (and PRUNED) trials, so trials closed as
    failed when their process died change nothing."""
    import optuna

    kinds = {
        "tpe": lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=4),
        "nsga2": lambda s: optuna.samplers.NSGAIISampler(seed=s, population_size=8),
        "cmaes": lambda s: optuna.samplers.CmaEsSampler(seed=s, warn_independent_sampling=False),
        "random": lambda s: optuna.samplers.RandomSampler(seed=s),
        "planner": lambda s: optuna.samplers.RandomSampler(seed=s),  # only the planner's seeds run
    }

    def make(at: int) -> Any:
        derived = int.from_bytes(hashlib.sha256(f"{seed}:{at}".encode()).digest()[:4], "big")
        return kinds[searcher](derived)

    return make


def _prepared_study(
    study: Any, study_name: str, config: dict[str, Any], calibrate: Callable[[], CostModel]
) -> CostModel:
    """The study's cost model: measured and stored on its first run (before its settings, so stored
    settings mean a stored cost model), read back on a resume, so that predicted speedups, the
    planner's seeds and the search space are those of the run it continues."""
    from .storage import Malformed, checked_cost_model, printable

    stored = study.user_attrs.get("config")
    if stored is not None and not isinstance(stored, dict):
        raise Malformed(study_name, "the settings", "config")
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise SearchError(
                f"study: {study_name!r} holds trials but no stepcache settings; pass another --study"
            )
        cost = calibrate()
        study.set_user_attr("cost_model", asdict(cost))
        study.set_user_attr("config", config)
        return cost
    if stored != config:
        diff = sorted(printable(k) for k in set(stored) | set(config) if stored.get(k) != config.get(k))
        raise SearchError(
            f"study: {study_name!r} in this storage was run with other settings ({', '.join(diff)}); "
            "pass another --study name or the same settings"
        )
    if "cost_model" not in study.user_attrs:  # begun by a version that did not store it
        cost = calibrate()
        study.set_user_attr("cost_model", asdict(cost))
        return cost
    try:
        return checked_cost_model(study.user_attrs["cost_model"])
    except ValueError as e:
        raise Malformed(study_name, "the settings", str(e)) from None


@dataclass
class _Resumed:
    queue: list[tuple[int | None, int | None, Candidate]]  # (position, planner seed, candidate)
    next_at: int
    points: int


def _resume(study: Any, study_name: str, r: _Run) -> _Resumed:
    """Reads a study back into ``r``: its evaluated points (and what they cost), and what is left
    to propose first: the positions a dead process left open, with the same candidates, then the
    planner's seeds not yet tried. Runs under the study's lock: a RUNNING trial is a dead one's."""
    from optuna.trial import TrialState

    from .storage import Malformed, checked_point, checked_proposal

    n = r.ev.num_steps
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    done: set[int] = set()
    open_at: dict[int, tuple[int, int | None, Candidate]] = {}
    seeds_done: set[int] = set()
    points = 0
    for t in study.get_trials(deepcopy=False):
        try:
            prop = checked_proposal(t.user_attrs["proposal"], n) if "proposal" in t.user_attrs else None
            if t.user_attrs.get("interrupted"):
                if prop is not None:
                    open_at.setdefault(prop[0], prop)
                continue
            if prop is not None:
                done.add(prop[0])
                seeds_done |= {prop[1]} - {None}
            if t.state == TrialState.COMPLETE and "point" in t.user_attrs:
                r.remember(checked_point(t.user_attrs["point"], n))
                points += 1
        except ValueError as e:
            raise Malformed(study_name, f"trial {t.number}", str(e)) from None
    queue: list[tuple[int | None, int | None, Candidate]] = [
        open_at[a] for a in sorted(open_at) if a not in done
    ]
    pending = {s for _, s, _ in queue} | seeds_done
    queue += [(None, i, c) for i, c in enumerate(r.planner_seeds()) if i not in pending]
    return _Resumed(queue, 1 + max(done | open_at.keys(), default=-1), points)


def _ask(
    study: Any, where: dict[str, Any], fixed: Candidate | None, k_max: int, cfg: bool, blocks: int
) -> tuple[Any, Candidate]:
    """A trial proposing ``fixed`` (a planner seed, or what a dead process was evaluating) or what
    the study's sampler proposes, recorded with its place in the sequence (``where``): for a fixed
    one at its creation, so that no trial of the study is ever without it for long."""
    if fixed is not None:
        proposal = {**where, "candidate": fixed.as_dict()}
        study.enqueue_trial(_params(fixed, cfg, blocks), user_attrs={"proposal": proposal})
    trial = study.ask()  # pops the trial just enqueued: the lock keeps every other one away
    cand = _suggest(trial, k_max, cfg, blocks)
    if fixed is None:
        trial.set_user_attr("proposal", {**where, "candidate": cand.as_dict()})
    return trial, cand


def _optuna_search(r: _Run, searcher: str, study: Any, seed: int, lock: Any = None) -> dict[str, Any]:
    from optuna.trial import TrialState

    multi = searcher == "nsga2"
    sampler_at = _sampler_at(searcher, seed)
    cfg, blocks = r.ev.cfg, r.cost.num_blocks
    resumed = _resume(study, study.study_name, r)
    queue, at = resumed.queue, resumed.next_at
    r.progress(r.used, r.budget, "resumed" if resumed.points else "")
    # No candidate computing more steps than this meets a speed target, whatever its guidance.
    k_max = max(1, (r.largest_feasible(0, **r.fastest_settings()) or Candidate(1, 0)).computed)
    width = r.pool.size if r.pool is not None else 1
    limit = max(200, int(100 * r.budget))  # infeasible proposals cost nothing; bound them
    while True:
        batch: list[tuple[Any, Candidate]] = []
        reserved = r.used
        exhausted = False
        while len(batch) < width:
            if lock is not None:
                lock.check()
            if queue:
                pos, seed_no, fixed = queue.pop(0)
            elif searcher == "planner" or at >= limit:
                break
            else:
                pos, seed_no, fixed = None, None, None
            if pos is None:
                pos, at = at, at + 1
            study.sampler = sampler_at(pos)
            trial, cand = _ask(study, {"at": pos, "seed": seed_no}, fixed, k_max, cfg, blocks)
            _, actions, speed = r.predict(cand)
            if not r.feasible_speed(speed):
                study.tell(trial, [-1.0, speed] if multi else -100.0 + speed)  # never evaluated: free
                continue
            cost = r.eval_cost(actions)
            if reserved + cost > r.budget + 1e-9:
                study.tell(trial, state=TrialState.FAIL)  # too dear for what is left; cheaper may fit
                exhausted = r.budget - reserved < 1.0 / r.ev.num_steps  # not even one computed step
                if exhausted:
                    break
                continue
            reserved += cost
            batch.append((trial, cand))
        if batch:
            points = r.run_many([cand for _, cand in batch])
            for (trial, _), point in zip(batch, points, strict=True):
                trial.set_user_attr("point", point)
                trial.set_user_attr("cost", point["cost"])
                study.tell(trial, [point["psnr"], point["speedup"]] if multi else r.score(point))
        if exhausted or not batch:
            break
    return {
        "searcher": searcher,
        "study": study.study_name,
        "trials": len(study.trials),
        "resumed_trials": resumed.points,
    }


def _evolution(r: _Run, seed: int) -> dict[str, Any]:
    """AutoDiffusion-style baseline: evolve which K timesteps run (order 0 reuse, which on an
    Euler sampler equals sampling on the shortened schedule), fitness = calibration PSNR."""
    rng = random.Random(seed)
    start = r.largest_feasible(0)
    if start is None:
        raise SearchError("speedup: no timestep subset reaches this target")
    n, k = r.ev.num_steps, start.computed

    def evaluate(steps: frozenset[int]) -> dict[str, Any] | None:
        mask = [s in steps for s in range(n)]
        actions = Candidate(k, 0).actions(mask, False)
        if not r.affordable(actions):
            return None
        res = r.ev.evaluate(Candidate(k, 0).policy(mask, cfg=False))
        r.used += res["cost"]
        point = {
            "candidate": {"computed": k, "order": 0, "timesteps": sorted(steps)},
            "psnr": res["psnr"],
            "speedup": r.cost.speedup(actions),
            "actions": res["actions"],
            "mask": mask,
            "adherence": res.get("adherence"),
        }
        r.evaluated.append(point)
        r.progress(r.used, r.budget, f"best {max(p['psnr'] for p in r.evaluated):.1f} dB")
        return point

    def mutate(steps: frozenset[int]) -> frozenset[int]:
        out = set(steps)  # move one computed step (never step 0) to a step not computed
        out.remove(rng.choice(sorted(out - {0})))
        out.add(rng.choice([s for s in range(1, n) if s not in out]))
        return frozenset(out)

    def crossover(a: frozenset[int], b: frozenset[int]) -> frozenset[int]:
        pool = sorted((a | b) - {0})
        return frozenset({0, *rng.sample(pool, k - 1)})

    subsets = math.comb(n - 1, k - 1)  # step 0 always computes
    population = [frozenset(s for s, m in enumerate(r.ev.mask(k, 0)) if m)]
    while len(population) < min(8, subsets):
        population.append(frozenset({0, *rng.sample(range(1, n), k - 1)}))
    scored: dict[frozenset[int], float] = {}
    generations = 0
    while True:
        fresh = [steps for steps in dict.fromkeys(population) if steps not in scored]
        if not fresh:  # every subset it can reach is scored: nothing left to learn
            break
        for steps in fresh:
            point = evaluate(steps)
            if point is None:
                return {"searcher": "evolution", "generations": generations}
            scored[steps] = point["psnr"]
        generations += 1
        if len(scored) >= subsets or k == 1:
            break
        parents = sorted(scored, key=scored.get, reverse=True)[:4]
        population = [*parents]
        for _ in range(64):  # offspring; a few tries each for one not yet scored
            if len(population) >= 8:
                break
            if len(parents) > 1 and rng.random() < 0.5:
                child = crossover(*rng.sample(parents, 2))
            else:
                child = mutate(rng.choice(parents))
            if child not in scored and child not in population:
                population.append(child)
    return {"searcher": "evolution", "generations": generations, "exhausted_subsets": len(scored) >= subsets}


def _model_hash(model: str) -> str:
    path = zoo.model_dir(model) / "model.safetensors"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def heldout_metrics(pipe: Any, ev: Evaluator, policy: Policy, repeats: int = 3) -> dict[str, Any]:
    """Held-out fidelity (PSNR, SSIM, class accuracy) and measured speedup of ``policy``."""
    res = ev.evaluate(policy)
    judge = Judge(ev.work.model, len(ev.work.seeds))
    ref_t, acc_t = [], []
    for _ in range(repeats):
        ref_t.append(_timed(lambda: ev.work.generate(pipe))[1])
        enable(pipe, policy)
        try:
            acc_t.append(_timed(lambda: ev.work.generate(pipe))[1])
        finally:
            disable(pipe)
    return {
        "seeds": [ev.work.seeds[0], ev.work.seeds[-1]],
        "psnr": res["psnr"],
        "psnr_ci": res["psnr_ci"],
        "ssim": res["ssim"],
        "class_acc": judge.class_acc(res["images"], ev.work.labels),
        "adherence": res.get("adherence"),
        "reference_adherence": ev.reference_adherence,
        "measured_speedup": statistics.median(ref_t) / statistics.median(acc_t),
        "actions": res["actions"],
    }


def _oracle(ev_ho: Evaluator, cost: CostModel, chosen: Candidate, psnr_goal: float) -> dict[str, Any]:
    """The planner with the held-out seeds' own trajectories (same estimator and guidance
    settings), at the fewest computed steps whose held-out PSNR reaches ``psnr_goal``."""
    n = ev_ho.num_steps
    for k in range(1, n + 1):  # ascending: the first that reaches the goal is the fastest
        cand = dataclasses.replace(chosen, computed=k)
        mask = ev_ho.mask(k, cand.order)
        res = ev_ho.evaluate(cand.policy(mask, ev_ho.cfg))
        if res["psnr"] >= psnr_goal - 1e-9:
            speed = cost.speedup_rows(res["row_actions"], cand.middle_fraction(cost.num_blocks))
            return {"computed": k, "psnr": res["psnr"], "speedup": speed, "actions": res["actions"]}
    return {"computed": n, "note": "only full compute reaches the searched PSNR"}


def _check_request(
    model: str,
    target: Target,
    budget: Any,
    searcher: str,
    storage: str | None,
    study: str | None,
    engine: str,
    workers: Any,
    calib_seeds: Any,
    heldout_seeds: Any,
    steps: Any,
) -> None:
    """Every argument a search can refuse before it loads a model."""
    if (problem := zoo.model_problem(model)) is not None:
        raise SearchError(f"model: {problem}")
    if target.min_adherence is not None and zoo.spec(model).world is None:
        raise SearchError(f"min_adherence: {model} has no prompt judge (the shapes models have one)")
    if searcher not in SEARCHERS:
        raise SearchError(f"searcher: unknown {searcher!r}; choose from {', '.join(SEARCHERS)}")
    _check_storage(searcher, storage, study)
    if engine not in ("local", "ray"):
        raise SearchError(f"engine: choose local or ray, got {engine!r}")
    if engine == "ray" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SearchError(f"workers: must be a positive integer, got {workers!r}")
    if engine == "ray" and searcher == "evolution":
        raise SearchError("engine: the evolutionary baseline runs locally only")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SearchError('engine: ray is not installed; pip install "stepcache[ray]"') from None
    if searcher == "evolution" and target.speedup is None:
        raise SearchError("searcher: the evolutionary timestep baseline takes a speedup target")
    for name, value in (("calib_seeds", calib_seeds), ("heldout_seeds", heldout_seeds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SearchError(f"{name}: must be a positive integer, got {value!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 2):
        raise SearchError(f"steps: must be an integer >= 2 (one step leaves nothing to skip), got {steps!r}")
    if calib_seeds > EVAL_SEED_BASE:
        raise SearchError(
            f"calib_seeds: at most {EVAL_SEED_BASE}, so calibration and held-out seeds stay disjoint"
        )
    # Compared before any float conversion: a huge integer budget overflows one.
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > MAX_BUDGET:
        shown = f"{budget:g}" if isinstance(budget, float) or budget < 10**18 else "a larger integer"
        raise SearchError(f"budget: at most {MAX_BUDGET:g} full-generation equivalents, got {shown}")
    # A candidate that meets the target costs about 1/speedup of a generation; with the reference
    # (1 generation), the budget must cover at least one.
    least = 1.0 + (1.0 / target.speedup if target.speedup is not None else 0.1)
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= least):
        raise SearchError(
            f"budget: {budget} full-generation equivalents cannot pay for the reference (1) and one "
            f"candidate (~{least - 1:.2f}); give at least {least:.2f}"
        )


def _check_storage(searcher: str, storage: str | None, study: str | None) -> None:
    if searcher == "cmaes":
        given = [name for name, value in (("storage", storage), ("study", study)) if value is not None]
        if given:
            raise SearchError(
                f"{given[0]}: --searcher cmaes keeps pickles (its optimizer state) in the storage, which "
                "stepcache never loads, so it cannot resume; run it without --storage and --study (in "
                "memory) or pick another searcher"
            )
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise SearchError("searcher: cmaes needs the cmaes package; pip install cmaes") from None
    if study is not None and (not isinstance(study, str) or "::lock::" in study):
        raise SearchError(f"study: {study!r} is not a study name ('::lock::' names stepcache's locks)")


@contextlib.contextmanager
def _held_study(storage: str | None, study_name: str) -> Iterator[tuple[Any, Any]]:
    """The storage opened and the study locked for this process, released on the way out."""
    if storage is None:
        yield None, None
        return
    from .storage import StudyLock, open_storage

    store = open_storage(storage)
    lock = StudyLock.acquire(store, study_name)
    try:
        yield store, lock
    finally:
        lock.release()


def _create_study(searcher: str, store: Any, study_name: str) -> Any:
    """The study on ``store`` (created, or loaded to resume), or in memory without one."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    multi = searcher == "nsga2"
    study = optuna.create_study(
        study_name=study_name,
        storage=store,
        sampler=_sampler_at(searcher, 0)(0),  # replaced at every proposal
        directions=["maximize", "maximize"] if multi else ["maximize"],
        load_if_exists=True,
    )
    if len(study.directions) != (2 if multi else 1):
        raise SearchError(
            f"study: {study_name!r} in this storage was run with other settings (directions); "
            "pass another --study name or the same settings"
        )
    return study


def _check_reachable(r: _Run) -> None:
    floor, full = r.target.min_adherence, r.ev.reference_adherence
    if floor is not None and full is not None and full < floor - 1e-9:
        raise SearchError(
            f"min_adherence: full compute itself reaches {full:.0%} on the calibration seeds, "
            f"below {floor:.0%}; lower the floor"
        )
    if r.target.speedup is None:
        return
    reachable = r.predict(Candidate(1, 0, **r.fastest_settings()))[2]
    if reachable < r.target.speedup:
        raise SearchError(
            f"speedup: at most {reachable:.2f}x is reachable on this device with {r.ev.num_steps} steps "
            "(computing only the first); lower the target or sample with more steps"
        )


def search(
    model: str,
    *,
    speedup: float | None = None,
    min_psnr: float | None = None,
    min_adherence: float | None = None,
    budget: float = 10.0,
    searcher: str = "tpe",
    storage: str | None = None,
    study: str | None = None,
    calib_seeds: int = 16,
    heldout_seeds: int = 16,
    steps: int | None = None,
    guidance: float | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    oracle: bool = True,
    blocks: bool = False,
    engine: str = "local",
    workers: int = 2,
    ray_address: str | None = None,
    command: str | None = None,
    progress: Callable[[float, float, str], None] | None = None,
) -> Policy:
    """Find a policy for zoo model ``model`` that meets the target; see the module docstring."""
    target = Target(speedup, min_psnr, min_adherence)
    target.check()
    _check_request(
        model, target, budget, searcher, storage, study, engine, workers, calib_seeds, heldout_seeds, steps
    )
    if out is not None:
        from ..bench.harness import check_out_dir

        check_out_dir(os.path.dirname(os.path.abspath(out)))
    say = progress or (lambda used, total, note: None)
    study_name = study or f"stepcache-{model}-{target.slug()}-{searcher}"

    with _held_study(storage if searcher != "evolution" else None, study_name) as (store, lock):
        pipe = zoo.load(model)
        calib = make_workload(pipe, model, steps, guidance, list(range(calib_seeds)))
        say(0.0, budget, "recording reference trajectories")
        ev = Evaluator(pipe, calib)

        def calibrate() -> CostModel:
            return CostModel.calibrate(ev, blocks=blocks)

        if searcher == "evolution":
            r = _Run(ev, calibrate(), target, float(budget), 1.0, say)
            _check_reachable(r)
            info = _evolution(r, seed)
        else:
            config = {
                "model": model,
                "steps": calib.steps,
                "guidance": calib.guidance,
                "calib_seeds": calib_seeds,
                "blocks": blocks,
                "target": target.as_dict(),
                "searcher": searcher,
                "seed": seed,
                # a study begun with the timed cost model must not continue on FLOP counts
                "cost_unit": "flops",
            }
            opt = _create_study(searcher, store, study_name)
            r = _Run(ev, _prepared_study(opt, study_name, config, calibrate), target, float(budget), 1.0, say)
            _check_reachable(r)
            if engine == "ray":
                from .remote import RayPool

                say(r.used, budget, f"starting {workers} Ray workers")
                r.pool = RayPool(model, calib, ev.reference, workers, ray_address)
            try:
                info = _optuna_search(r, searcher, opt, seed, lock)
            finally:
                if r.pool is not None:
                    r.pool.close()
            info["engine"] = engine if engine == "local" else f"ray ({workers} workers)"
    cost = r.cost
    best = r.best()
    target_met = best is not None
    if best is None:  # report the closest, and say so
        best = max(r.evaluated, key=r.score) if r.evaluated else None
    if best is None:
        raise SearchError("budget: exhausted before any candidate could be evaluated")

    chosen_mask = best["mask"]
    cdict = {k: v for k, v in best["candidate"].items() if k != "timesteps"}
    chosen = Candidate(**cdict)
    policy = chosen.policy(chosen_mask, ev.cfg, name=f"searched {model} {target.slug()}")
    say(r.used, budget, "held-out evaluation")
    heldout_work = make_workload(
        pipe, model, calib.steps, calib.guidance, [EVAL_SEED_BASE + i for i in range(heldout_seeds)]
    )
    ev_ho = Evaluator(pipe, heldout_work)
    held = heldout_metrics(pipe, ev_ho, policy)
    held["predicted_speedup"] = best["speedup"]
    limit = _oracle(ev_ho, cost, chosen, held["psnr"]) if oracle else None
    if limit and limit.get("speedup"):
        limit["searched_over_oracle_speedup"] = best["speedup"] / limit["speedup"]
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    meta = {
        "model": model,
        "model_hash": _model_hash(model),
        "scheduler": type(pipe.scheduler).__name__,
        "steps": calib.steps,
        "guidance_scale": calib.guidance,
        "resolution": int(denoiser.config.sample_size),
        "found_by": command or "python " + " ".join(sys.argv),
        "target": {**target.as_dict(), "met_on_calibration": target_met},
        "budget_used": round(r.used, 4),
        "calibration": {
            "seeds": [0, calib_seeds - 1],
            "psnr": best["psnr"],
            "predicted_speedup": best["speedup"],
            "actions": best["actions"],
            "adherence": best.get("adherence"),
            "reference_adherence": ev.reference_adherence,
        },
        "heldout": held,
        "pareto": [
            {"psnr": p["psnr"], "speedup": p["speedup"], "candidate": p["candidate"]}
            for p in _pareto(r.evaluated)
        ],
        "oracle": limit or {},
        "search": {
            **info,
            "budget": budget,
            "evaluated": len(r.evaluated),
            "cost_model": asdict(cost),
            "candidate": best["candidate"],
        },
    }
    policy = Policy.from_dict({**policy.to_dict(), "meta": meta})
    if out is not None:
        policy.save(out)
    return policy
