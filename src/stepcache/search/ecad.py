"""ECAD-style baseline searcher: a genetic algorithm over per-step x per-block cache masks
(Aggarwal et al., ICLR 2026, "Evolutionary Caching to Accelerate Your Off-the-Shelf Diffusion Model").

ECAD evolves binary masks saying, for each step and block, whether the block recomputes or reuses
its cached output, scored on a small calibration set. Our block level skips one contiguous span per
step, so here a genome holds, per step, one of three genes: ``C`` (every block runs), ``P`` (only
the span's leading and trailing blocks run; the middle's residual of the last full step is reused)
or ``E`` (no network call: the output is extrapolated), plus the span itself (leading and trailing
blocks kept) and the extrapolation order. The first population is evenly spaced full steps (the
most that meet the target, as the annealing baseline starts) and random genomes; offspring
(uniform crossover, per-step mutation) are
repaired to the speed target by demoting random steps (C -> P -> E), then promoting where slack
allows; fitness is calibration PSNR, every evaluation paid from the same budget as the other
searchers. The target fixes the speed, so selection is by PSNR alone (ECAD's Pareto front
collapses to its point at that speed).
"""

from __future__ import annotations

import random
from typing import Any

from .space import Candidate

POPULATION = 8
ELITE = 4
MUTATION = 0.15  # per-step chance a child's gene is redrawn
ORDERS = (0, 1, 2)
STALE = 50  # children in a row that were all scored before end the search

Genome = tuple[tuple[str, ...], int, int, int]  # (per-step genes, leading, trailing, order)


def ecad(r: Any, seed: int) -> dict[str, Any]:
    """Run the ECAD-style baseline on a search run ``r`` (``study._Run``) until its budget is spent."""
    from .study import SearchError, evaluate_steps

    rng = random.Random(seed)
    n, blocks = r.ev.num_steps, r.cost.num_blocks
    genes = ("C", "P", "E") if blocks >= 3 else ("C", "E")  # a span needs a block on each side
    spans = [(fn, bn) for fn in (1, 2) for bn in (0, 1) if fn + bn < blocks] or [(0, 0)]

    def candidate(g: Genome) -> Candidate:
        steps, fn, bn, order = g
        partial = tuple(s for s, a in enumerate(steps) if a == "P")
        computed = sum(a != "E" for a in steps)
        return Candidate(computed, order, block_fn=fn, block_bn=bn, partial=partial)

    def speed(g: Genome) -> float:
        # each step's gene is what all its rows do: the cost model's per-row count reads it as is
        return r.cost.speedup_rows(list(g[0]), candidate(g).middle_fraction(blocks))

    def repair(g: Genome) -> Genome | None:
        steps = list(g[0])
        movable = list(range(1, n))  # step 0 always runs in full: nothing to reuse before it
        rng.shuffle(movable)
        while not r.feasible_speed(speed((tuple(steps), *g[1:]))):
            demotable = [s for s in movable if steps[s] != "E"]
            if not demotable:
                return None
            s = demotable[0]
            steps[s] = genes[genes.index(steps[s]) + 1]
            movable.remove(s)
            movable.append(s)
        for s in movable:  # spend the slack the target leaves
            if steps[s] == "C":
                continue
            trial = list(steps)
            trial[s] = genes[genes.index(steps[s]) - 1]
            if r.feasible_speed(speed((tuple(trial), *g[1:]))):
                steps = trial
        return (tuple(steps), *g[1:])

    def random_genome() -> Genome | None:
        steps = ("C", *(rng.choice(genes) for _ in range(n - 1)))
        return repair((steps, *rng.choice(spans), rng.choice(ORDERS)))

    scored: dict[Genome, float] = {}

    def fitness(g: Genome) -> float | None:
        if g not in scored:
            cand = candidate(g)
            point = evaluate_steps(r, cand, frozenset(s for s, a in enumerate(g[0]) if a != "E"))
            if point is None:
                return None
            scored[g] = point.psnr
        return scored[g]

    even = None
    for k in range(n, 0, -1):  # the most evenly spaced full steps that meet the target
        even = (_even_steps(n, k), *spans[0], 1)
        if r.feasible_speed(speed(even)):
            break
    else:
        even = None
    population = [g for g in (even, *(random_genome() for _ in range(4 * POPULATION))) if g is not None]
    population = list(dict.fromkeys(population))[:POPULATION]
    if not population:
        raise SearchError("speedup: no cache mask reaches this target")
    generations = stale = 0
    while stale < STALE:
        for g in population:
            if fitness(g) is None:  # the budget cannot pay for another evaluation
                return _info(generations, scored)
        generations += 1
        elite = sorted(scored, key=scored.get, reverse=True)[:ELITE]
        population = list(elite)
        while len(population) < POPULATION and stale < STALE:
            a, b = rng.sample(elite, 2) if len(elite) > 1 else (elite[0], elite[0])
            steps = tuple(
                rng.choice(genes) if s and rng.random() < MUTATION else (x if rng.random() < 0.5 else y)
                for s, (x, y) in enumerate(zip(a[0], b[0], strict=True))
            )
            span = rng.choice(spans) if rng.random() < MUTATION else rng.choice((a[1:3], b[1:3]))
            order = rng.choice(ORDERS) if rng.random() < MUTATION else rng.choice((a[3], b[3]))
            child = repair((steps, *span, order))
            if child is None or child in scored or child in population:
                stale += 1
                continue
            stale = 0
            population.append(child)
    return _info(generations, scored)


def _even_steps(n: int, k: int) -> tuple[str, ...]:
    """``k`` of ``n`` steps run in full, evenly spaced, step 0 first; the others extrapolated."""
    from .anneal import _even

    full = _even(n, k)
    return tuple("C" if s in full else "E" for s in range(n))


def _info(generations: int, scored: dict[Genome, float]) -> dict[str, Any]:
    return {
        "searcher": "ecad",
        "generations": generations,
        "scored": len(scored),
        "scored_with_partial_steps": sum("P" in g[0] for g in scored),
    }
