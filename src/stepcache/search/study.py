"""Target-driven policy search: "3x faster at the best PSNR" or "the fastest at PSNR >= 30 dB".

1. Record full-compute reference trajectories on the calibration seeds (cost: 1 generation).
2. Count each action's FLOPs once (full step, estimated step, conditional-only step, partial
   step): a deterministic cost model that predicts a candidate's work from its per-step actions,
   so the same command on the same seeds chooses the same policy on a busy or an idle machine.
   Wall-clock is measured on the held-out seeds and reported beside it, never used to choose.
3. Search the joint space of ``space.Candidate`` with an Optuna sampler, seeded with the
   planner's answers, or with the planner alone, or with an AutoDiffusion-style evolutionary
   baseline. A candidate's evaluation costs its computed fraction of one calibration generation;
   the budget is counted in those full-generation equivalents. With a speed target, the Optuna
   searchers keep ``POLISH_SHARE`` of the budget to hill-climb the best schedule's steps
   (``_Run.polish``): the planner places them for the polynomial forecast, not the fitted one.
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

from .. import zoo
from .._limits import MAX_BUDGET
from ..api import disable, enable
from ..bench.harness import EVAL_SEED_BASE, Judge, _timed
from ..pipelines import fingerprint
from ..policy import Policy
from .evaluate import CostModel, Evaluator, SearchError, policy_key
from .space import Bounds, Candidate, Point, params, suggest
from .trajectory import NotFirstOrderError

SEARCHERS = ("tpe", "nsga2", "cmaes", "random", "planner", "evolution", "anneal", "ecad")
POLISH_SHARE = 0.3  # of a speed-targeted search's budget, kept for moving the best schedule's steps
BASELINES = ("evolution", "anneal", "ecad")  # step-set searchers of their papers, run locally without storage


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


def _pareto(points: list[Point]) -> list[Point]:
    from ..bench.report import pareto_front

    front = pareto_front([(p.speedup, p.psnr) for p in points])
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
        self.evaluated: list[Point] = []
        self.pool: Any = None  # a remote pool (``remote.RayPool``), or None: evaluate here
        # Results by policy_key, without images: a policy seen before (in this process or in the
        # resumed part of a study) costs nothing, wherever it would run.
        self.known: dict[str, dict[str, Any]] = {}

    def settle_guidance(self) -> None:
        """A guidance scale above 1 that the runtime finds no unconditional pass for (a distilled
        guidance embedding, FLUX's ``guidance_scale``) leaves nothing to search at the guidance
        level: the cost model then measured no saving for conditional-only steps."""
        if self.ev.cfg and self.cost.save_cond_only <= 0:
            self.ev.cfg = False

    def predict(self, cand: Candidate, mask: list[bool] | None = None) -> tuple[list[bool], str, float]:
        """Mask (the planner's, unless given), step actions and predicted speedup; with a block
        rule, whose partial steps depend on the data, the speedup is an upper bound and the
        evaluation gives the real one."""
        mask = self.ev.mask(cand.computed, cand.order, cand.stride) if mask is None else mask
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
        runs half of the batch's rows; a partial step (P) is counted as half, as the evaluator does."""
        return (actions.count("C") + 0.5 * (actions.count("G") + actions.count("P"))) / len(actions)

    def affordable(self, actions: str) -> bool:
        return self.used + self.eval_cost(actions) <= self.budget + 1e-9

    def fastest_settings(self) -> dict[str, Any]:
        """The guidance and block settings that save the most time per computed step."""
        fastest: dict[str, Any] = {"cfg_full": 0.0, "cfg_mode": "cond-only"} if self.ev.cfg else {}
        if self.cost.num_blocks >= 2:
            fastest["block_fn"] = 1
        return fastest

    def run_many(self, cands: list[Candidate], masks: list[list[bool]] | None = None) -> list[Point]:
        """Evaluate candidates (on the pool's workers, in parallel when it has several), on the
        planner's masks unless ``masks`` are given."""
        masks = masks or [None] * len(cands)  # type: ignore[list-item]
        prepared = [(cand, *self.predict(cand, mask)) for cand, mask in zip(cands, masks, strict=True)]
        policies = [cand.policy(mask, self.ev.cfg) for cand, mask, _, _ in prepared]
        keys = [policy_key(p, cand.fitted) for p, (cand, *_) in zip(policies, prepared, strict=True)]
        fresh = list(dict.fromkeys(k for k in keys if k not in self.known))
        todo = [(policies[i], prepared[i][0].fitted) for i in map(keys.index, fresh)]
        if self.pool is not None:
            results = self.pool.evaluate(todo)
        else:
            results = [self.ev.evaluate(p, fit=fit) for p, fit in todo]
        for k, res in zip(fresh, results, strict=True):
            self.known[k] = {name: v for name, v in res.items() if name != "images"}
        unpaid = set(fresh)  # each fresh policy pays once, even when a batch holds it twice
        points = []
        for (cand, mask, _, _), key in zip(prepared, keys, strict=True):
            res = self.known[key]
            cost = res["cost"] if key in unpaid else 0.0
            unpaid.discard(key)
            self.used += cost
            speed = self.cost.speedup_rows(res["row_actions"], cand.middle_fraction(self.cost.num_blocks))
            point = Point(
                candidate=cand,
                psnr=res["psnr"],
                speedup=speed,
                actions=res["actions"],
                mask=list(mask),
                cost=cost,
                row_actions=list(res["row_actions"]),
                adherence=res.get("adherence"),
                psnr_median=res.get("psnr_median"),
                weights=res.get("weights"),
            )
            self.evaluated.append(point)
            points.append(point)
        best = self.best()
        self.progress(
            self.used, self.budget, f"best {best.psnr:.1f} dB at {best.speedup:.2f}x" if best else ""
        )
        return points

    def remember(self, point: Point) -> None:
        """A point evaluated before (a resumed study's): counted, and free when proposed again."""
        self.evaluated.append(point)
        self.used += point.cost
        if point.row_actions:  # stored since the study kept them; older points pay again
            policy = point.candidate.policy(point.mask, self.ev.cfg)
            self.known.setdefault(policy_key(policy, point.candidate.fitted), point.as_dict())

    def score(self, point: Point) -> float:
        """One number to maximise: for a speed target, the median PSNR over the calibration seeds
        (a few seeds an estimator happens to fit far above the rest inflate the mean, and that
        lead does not carry to unseen seeds); for a PSNR target, the predicted speedup (negative,
        by the mean PSNR's shortfall, when the target is missed)."""
        if self.target.speedup is not None:  # too slow once measured: ranked below every fast one
            typical = point.psnr if point.psnr_median is None else point.psnr_median
            return typical if self.meets(point) else -100.0 + point.speedup
        shortfall = self.target.min_psnr - point.psnr
        return point.speedup if shortfall <= 0 else -shortfall

    def meets(self, point: Point) -> bool:
        floor = self.target.min_adherence
        if floor is not None and (point.adherence is None or point.adherence < floor - 1e-9):
            return False
        if self.target.speedup is not None:
            return self.feasible_speed(point.speedup)
        return point.psnr >= self.target.min_psnr

    def best(self) -> Point | None:
        ok = [p for p in self.evaluated if self.meets(p)]
        return max(ok, key=self.score) if ok else None

    def polish(self) -> int:
        """Hill climb on the best point's schedule: move one computed step (never the first) to a
        free neighbouring step and keep the move when the calibration score rises, until no move
        helps or the budget is spent; returns the moves kept. The planner places the steps for
        the polynomial forecast; a fitted forecast or a guidance rule may be better served by
        others (on emoji-dit at 3x, two moves gain 2.7 dB held out). Speed targets only (a move
        keeps the work, so it cannot raise a speed score), and not for a candidate with named
        partial steps, which a move would change."""
        best = self.best()
        if best is None or self.target.speedup is None or best.candidate.partial:
            return 0
        moves, improved = 0, True
        while improved:
            improved = False
            for mask in neighbour_masks(best.mask):
                _, actions, speed = self.predict(best.candidate, mask)
                if not self.feasible_speed(speed):
                    continue
                if not self.affordable(actions):
                    return moves
                point = self.run_many([best.candidate], [mask])[0]
                if self.meets(point) and self.score(point) > self.score(best):
                    best, moves, improved = point, moves + 1, True
                    break
        return moves

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
        # The forecast fitted to the calibration trajectory (search.fit), on the planner's steps.
        for cfg in cfgs:
            cand = self.largest_feasible(1, expansion="fitted", **cfg)
            if cand is not None and cand not in seeds:
                seeds.append(cand)
        # The peers' own schedule (warm-up, then every 2nd step, TaylorSeer's second-order
        # expansion), so a tuned fixed-schedule peer is a point this search has tried.
        cand = self.largest_feasible(2, stride=2, expansion="taylor")
        if cand is not None and cand not in seeds:
            seeds.append(cand)
        return seeds


def neighbour_masks(mask: list[bool]) -> list[list[bool]]:
    """Every mask with one computed step after the first moved to a free neighbour (later, then
    earlier, in step order): the polish's moves."""
    out = []
    for i, on in enumerate(mask):
        if not on or i == 0:
            continue
        for j in (i + 1, i - 1):
            if 0 < j < len(mask) and not mask[j]:
                moved = list(mask)
                moved[i], moved[j] = False, True
                out.append(moved)
    return out


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


def _ask(study: Any, where: dict[str, Any], fixed: Candidate | None, bounds: Bounds) -> tuple[Any, Candidate]:
    """A trial proposing ``fixed`` (a planner seed, or what a dead process was evaluating) or what
    the study's sampler proposes, recorded with its place in the sequence (``where``): for a fixed
    one at its creation, so that no trial of the study is ever without it for long."""
    if fixed is not None:
        proposal = {**where, "candidate": fixed.as_dict()}
        study.enqueue_trial(params(fixed, bounds), user_attrs={"proposal": proposal})
    trial = study.ask()  # pops the trial just enqueued: the lock keeps every other one away
    cand = suggest(trial, bounds)
    if fixed is None:
        trial.set_user_attr("proposal", {**where, "candidate": cand.as_dict()})
    return trial, cand


def _optuna_search(
    r: _Run, searcher: str, study: Any, seed: int, lock: Any = None, keep: float = 0.0
) -> dict[str, Any]:
    """The Optuna loop; once a point meets the target it leaves ``keep`` of the budget unspent
    (for the polish), so a budget too small for both still buys a first point."""
    from optuna.trial import TrialState

    multi = searcher == "nsga2"
    sampler_at = _sampler_at(searcher, seed)
    resumed = _resume(study, study.study_name, r)
    queue, at = resumed.queue, resumed.next_at
    r.progress(r.used, r.budget, "resumed" if resumed.points else "")
    # No candidate computing more steps than this meets a speed target, whatever its guidance.
    k_max = max(1, (r.largest_feasible(0, **r.fastest_settings()) or Candidate(1, 0)).computed)
    bounds = Bounds(k_max=k_max, cfg=r.ev.cfg, num_blocks=r.cost.num_blocks)
    width = r.pool.size if r.pool is not None else 1
    limit = max(200, int(100 * (r.budget - keep)))  # infeasible proposals cost nothing; bound them
    while True:
        batch: list[tuple[Any, Candidate]] = []
        reserved = r.used
        exhausted = False
        cap = r.budget - (keep if r.best() is not None else 0.0)
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
            trial, cand = _ask(study, {"at": pos, "seed": seed_no}, fixed, bounds)
            _, actions, speed = r.predict(cand)
            if not r.feasible_speed(speed):
                study.tell(trial, [-1.0, speed] if multi else -100.0 + speed)  # never evaluated: free
                continue
            cost = r.eval_cost(actions)
            if reserved + cost > cap + 1e-9:
                study.tell(trial, state=TrialState.FAIL)  # too dear for what is left; cheaper may fit
                exhausted = cap - reserved < 1.0 / r.ev.num_steps  # not even one computed step
                if exhausted:
                    break
                continue
            reserved += cost
            batch.append((trial, cand))
        if batch:
            points = r.run_many([cand for _, cand in batch])
            for (trial, _), point in zip(batch, points, strict=True):
                trial.set_user_attr("point", point.as_dict())
                trial.set_user_attr("cost", point.cost)
                study.tell(trial, [point.psnr, point.speedup] if multi else r.score(point))
        if exhausted or not batch:
            break
    return {
        "searcher": searcher,
        "study": study.study_name,
        "trials": len(study.trials),
        "resumed_trials": resumed.points,
    }


def evaluate_steps(r: _Run, cand: Candidate, steps: frozenset[int]) -> Point | None:
    """``cand`` run on exactly the timesteps ``steps`` (no guidance rule), or None when the
    budget left cannot pay for it."""
    mask = [s in steps for s in range(r.ev.num_steps)]
    actions = "".join("P" if s in cand.partial else a for s, a in enumerate(cand.actions(mask, False)))
    if not r.affordable(actions):
        return None
    res = r.ev.evaluate(cand.policy(mask, cfg=False), fit=cand.fitted)
    r.used += res["cost"]
    point = Point(
        candidate=cand,
        psnr=res["psnr"],
        speedup=r.cost.speedup_rows(res["row_actions"], cand.middle_fraction(r.cost.num_blocks)),
        actions=res["actions"],
        mask=mask,
        cost=res["cost"],
        adherence=res.get("adherence"),
        psnr_median=res.get("psnr_median"),
        weights=res.get("weights"),
    )
    r.evaluated.append(point)
    r.progress(r.used, r.budget, f"best {max(p.psnr for p in r.evaluated):.1f} dB")
    return point


def _evolution(r: _Run, seed: int) -> dict[str, Any]:
    """AutoDiffusion-style baseline: evolve which K timesteps run (order 0 reuse, which on an
    Euler sampler equals sampling on the shortened schedule), fitness = calibration PSNR."""
    rng = random.Random(seed)
    start = r.largest_feasible(0)
    if start is None:
        raise SearchError("speedup: no timestep subset reaches this target")
    n, k = r.ev.num_steps, start.computed

    def evaluate(steps: frozenset[int]) -> Point | None:
        return evaluate_steps(r, Candidate(k, 0), steps)

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
            scored[steps] = point.psnr
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


def _label(model: Any) -> str:
    """A short name for the policy and the study: the zoo key, the factory, the folder's own
    name (not its whole path: a policy name holds 200 characters), or the pipeline's class."""
    if not isinstance(model, str):
        return type(model).__name__
    from pathlib import Path

    name = Path(model).name if Path(model).is_dir() else model
    return name[:80] or "pipeline"


def _resolution(pipe: Any, ev: Evaluator) -> int | list[int]:
    """A zoo model's sample size, else the height and width of the reference images."""
    from ..adapters import find_denoiser

    size = getattr(getattr(find_denoiser(pipe), "config", None), "sample_size", None)
    if isinstance(size, int) and getattr(pipe, "default_steps", None) is not None:
        return size
    return [int(ev.reference.shape[1]), int(ev.reference.shape[2])]


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
        "row_actions": res["row_actions"],
    }


def _oracle(ev_ho: Evaluator, cost: CostModel, chosen: Candidate, psnr_goal: float) -> dict[str, Any]:
    """The planner with the held-out seeds' own trajectories (same estimator and guidance
    settings), at the fewest computed steps whose held-out PSNR reaches ``psnr_goal``."""
    n = ev_ho.num_steps
    for k in range(1, n + 1):  # ascending: the first that reaches the goal is the fastest
        cand = dataclasses.replace(chosen, computed=k, stride=0)
        mask = ev_ho.mask(k, cand.order)
        res = ev_ho.evaluate(cand.policy(mask, ev_ho.cfg), fit=cand.fitted)  # fitted: to these seeds
        if res["psnr"] >= psnr_goal - 1e-9:
            speed = cost.speedup_rows(res["row_actions"], cand.middle_fraction(cost.num_blocks))
            return {"computed": k, "psnr": res["psnr"], "speedup": speed, "actions": res["actions"]}
    return {"computed": n, "note": "only full compute reaches the searched PSNR"}


def _check_request(
    model: Any,
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
    from ..pipelines import PipelineSpecError, check_spec, is_zoo

    if isinstance(model, str):
        try:
            check_spec(model)
        except PipelineSpecError as e:
            raise SearchError(str(e)) from None
    if target.min_adherence is not None and not (is_zoo(model) and zoo.spec(model).world is not None):
        shown = model if isinstance(model, str) else type(model).__name__
        raise SearchError(f"min_adherence: {shown} has no prompt judge (the shapes models have one)")
    if searcher not in SEARCHERS:
        raise SearchError(f"searcher: unknown {searcher!r}; choose from {', '.join(SEARCHERS)}")
    _check_storage(searcher, storage, study)
    if engine not in ("local", "ray"):
        raise SearchError(f"engine: choose local or ray, got {engine!r}")
    if engine == "ray" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SearchError(f"workers: must be a positive integer, got {workers!r}")
    if engine == "ray" and not isinstance(model, str):
        raise SearchError(
            "engine: Ray workers load the pipeline themselves; pass a spec (zoo key, folder or "
            "module:function), not a pipeline object"
        )
    if engine == "ray" and searcher in BASELINES:
        raise SearchError(f"engine: the {searcher} baseline runs locally only")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SearchError('engine: ray is not installed; pip install "stepcache[ray]"') from None
    if searcher in BASELINES and target.speedup is None:
        raise SearchError(f"searcher: the {searcher} timestep baseline takes a speedup target")
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


@dataclass(frozen=True)
class SearchConfig:
    """How a search runs (the target aside): its budget in full-generation equivalents of the
    calibration batch, the searcher and its seed, the Optuna storage and study to resume, the zoo
    seed counts, steps and guidance (a workload carries its own), the held-out oracle, whether
    the block level is searched, and where candidates are evaluated (``local`` or ``ray``)."""

    budget: float = 10.0
    searcher: str = "tpe"
    storage: str | None = None
    study: str | None = None
    calib_seeds: int | None = None
    heldout_seeds: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    oracle: bool = True
    blocks: bool = False
    engine: str = "local"
    workers: int = 2
    ray_address: str | None = None


def search(
    model: Any,
    workload: Any = None,
    *,
    speedup: float | None = None,
    min_psnr: float | None = None,
    min_adherence: float | None = None,
    config: SearchConfig | None = None,
    out: str | os.PathLike | None = None,
    command: str | None = None,
    progress: Callable[[float, float, str], None] | None = None,
    **settings: Any,
) -> Policy:
    """Find a policy that meets the target on ``model``: a zoo key, a pipeline spec (diffusers
    folder, ``module:function``) or a pipeline object, generating ``workload`` (required outside
    the zoo; its calibration and held-out seeds, steps and guidance are the search's). How it
    runs is a ``SearchConfig``, given whole as ``config`` or field by field as keywords
    (``budget=5``). See the module docstring."""
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise SearchError(f"{unknown[0]}: not a search setting; settings are {', '.join(sorted(fields))}")
    cfg = dataclasses.replace(config or SearchConfig(), **settings)
    budget, searcher, storage, study = cfg.budget, cfg.searcher, cfg.storage, cfg.study
    calib_seeds, heldout_seeds, steps, guidance = cfg.calib_seeds, cfg.heldout_seeds, cfg.steps, cfg.guidance
    seed, oracle, blocks = cfg.seed, cfg.oracle, cfg.blocks
    engine, workers, ray_address = cfg.engine, cfg.workers, cfg.ray_address
    from ..bench.harness import batch_for, resolve
    from ..pipelines import PipelineSpecError, load_pipeline
    from ..workload import WorkloadError

    target = Target(speedup, min_psnr, min_adherence)
    target.check()
    try:
        wl = resolve(model, workload, steps, guidance, None)
    except (WorkloadError, PipelineSpecError) as e:
        raise SearchError(str(e)) from None
    if wl is not None:
        given = [
            n for n, v in (("calib_seeds", calib_seeds), ("heldout_seeds", heldout_seeds)) if v is not None
        ]
        if given:
            raise SearchError(f"{given[0]}: set it in the workload, not beside it")
    calib_seeds = 16 if calib_seeds is None else calib_seeds
    heldout_seeds = 16 if heldout_seeds is None else heldout_seeds
    _check_request(
        model, target, budget, searcher, storage, study, engine, workers, calib_seeds, heldout_seeds, steps
    )
    if out is not None:
        from ..bench.harness import check_out_dir

        check_out_dir(os.path.dirname(os.path.abspath(out)))
    say = progress or (lambda used, total, note: None)
    label = _label(model)
    study_name = study or f"stepcache-{label}-{target.slug()}-{searcher}"

    # Loaded (and the workload checked against it) before the study's storage is opened: a
    # pipeline that fails to load leaves nothing behind.
    say(0.0, budget, "loading the pipeline")
    try:
        loaded = load_pipeline(model)
        pipe = loaded.pipe
        calib = batch_for(loaded, wl, "calib", calib_seeds, steps, guidance)
    except (WorkloadError, PipelineSpecError) as e:
        raise SearchError(str(e)) from None
    with _held_study(storage if searcher not in BASELINES else None, study_name) as (store, lock):
        say(0.0, budget, "recording reference trajectories")
        try:
            ev = Evaluator(pipe, calib)
        except NotFirstOrderError as e:
            raise SearchError(f"scheduler: {e}") from None

        def calibrate() -> CostModel:
            # the ECAD-style genome is per step x per block: it needs the partial step's cost
            return CostModel.calibrate(ev, blocks=blocks or searcher == "ecad")

        if searcher in BASELINES:
            from .anneal import anneal
            from .ecad import ecad

            r = _Run(ev, calibrate(), target, float(budget), 1.0, say)
            r.settle_guidance()
            _check_reachable(r)
            info = {"evolution": _evolution, "anneal": anneal, "ecad": ecad}[searcher](r, seed)
        else:
            config = {
                "model": loaded.name,
                **({"workload": wl.to_dict()} if wl is not None else {}),
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
            r.settle_guidance()
            _check_reachable(r)
            if engine == "ray":
                from .remote import RayPool

                say(r.used, budget, f"starting {workers} Ray workers")
                r.pool = RayPool(model, wl, calib, ev.reference, workers, ray_address, samples=ev.samples)
            try:
                # A share of the budget is kept back to polish the best schedule's steps.
                polishing = target.speedup is not None and searcher != "planner"
                keep = float(budget) * POLISH_SHARE if polishing else 0.0
                info = _optuna_search(r, searcher, opt, seed, lock, keep=keep)
                if polishing:
                    info["polish_moves"] = r.polish()
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

    chosen = best.candidate
    policy = best.policy(ev.cfg, name=f"searched {label} {target.slug()}")
    say(r.used, budget, "held-out evaluation")
    ev_ho = Evaluator(pipe, batch_for(loaded, wl, "heldout", heldout_seeds, calib.steps, calib.guidance))
    ev_ho.cfg = ev.cfg
    held = heldout_metrics(pipe, ev_ho, policy)
    # What ran on the held-out seeds: a step whose estimate is rejected there computes instead,
    # so the policy can be slower than the calibration seeds said.
    held["flop_speedup"] = cost.speedup_rows(held.pop("row_actions"), chosen.middle_fraction(cost.num_blocks))
    limit = _oracle(ev_ho, cost, chosen, held["psnr"]) if oracle else None
    if limit and limit.get("speedup"):
        limit["searched_over_oracle_speedup"] = best.speedup / limit["speedup"]
    meta = {
        "model": loaded.name,
        "model_hash": _model_hash(loaded.name) if loaded.zoo else fingerprint(pipe),
        "scheduler": type(pipe.scheduler).__name__,
        "steps": calib.steps,
        "guidance_scale": calib.guidance,
        "resolution": _resolution(pipe, ev),
        **({"workload": wl.to_dict()} if wl is not None else {}),
        "found_by": command or "python " + " ".join(sys.argv),
        "target": {**target.as_dict(), "met_on_calibration": target_met},
        "budget_used": round(r.used, 4),
        "calibration": {
            "seeds": [calib.seeds[0], calib.seeds[-1]],
            "psnr": best.psnr,
            "psnr_median": best.psnr_median,
            "predicted_speedup": best.speedup,
            "actions": best.actions,
            "adherence": best.adherence,
            "reference_adherence": ev.reference_adherence,
        },
        "heldout": held,
        "pareto": [
            {"psnr": p.psnr, "speedup": p.speedup, "candidate": p.candidate.as_dict()}
            for p in _pareto(r.evaluated)
        ],
        "oracle": limit or {},
        "search": {
            **info,
            "budget": budget,
            "evaluated": len(r.evaluated),
            "cost_model": asdict(cost),
            "candidate": best.candidate.as_dict(),
        },
    }
    policy = Policy.from_dict({**policy.to_dict(), "meta": meta})
    if out is not None:
        policy.save(out)
    return policy
