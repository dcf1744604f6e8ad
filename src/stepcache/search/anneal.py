"""BudCache-style baseline searcher: budget first, then simulated annealing with hill climbing.

The speed target fixes the number of computed steps (the most that still meets it); the search
then moves computed steps and the extrapolation order of the others, accepting a worse schedule
with a probability that cools to zero over the first 70% of the budget, and only improvements
after (hill climbing). It starts from evenly spaced steps, not from our planner, as a searcher
without one would. Fitness is calibration PSNR, each evaluation paid from the same budget as the
other searchers.
"""

from __future__ import annotations

import math
import random
from typing import Any

from .space import Candidate

START_TEMPERATURE = 2.0  # dB: a move 2 dB worse is accepted with probability 1/e at the start
ANNEAL_SHARE = 0.7  # of the budget spent annealing; the rest climbs
ORDERS = (0, 1, 2)
STALE = 50  # proposals in a row that were all scored before end the search


def _even(n: int, k: int) -> frozenset[int]:
    """``k`` of ``n`` steps, evenly spaced, step 0 first."""
    return frozenset(round(i * (n - 1) / max(1, k - 1)) for i in range(k)) if k > 1 else frozenset({0})


def anneal(r: Any, seed: int) -> dict[str, Any]:
    """Run the annealing baseline on a search run ``r`` (``study._Run``) until its budget is spent."""
    from .study import SearchError, evaluate_steps

    rng = random.Random(seed)
    start = r.largest_feasible(0)
    if start is None:
        raise SearchError("speedup: no timestep subset reaches this target")
    n, k = r.ev.num_steps, start.computed
    scored: dict[tuple[frozenset[int], int], float] = {}

    def score(steps: frozenset[int], order: int) -> float | None:
        key = (steps, order)
        if key not in scored:
            point = evaluate_steps(r, Candidate(k, order), steps)
            if point is None:
                return None
            scored[key] = point.psnr
        return scored[key]

    def neighbour(steps: frozenset[int], order: int) -> tuple[frozenset[int], int]:
        if rng.random() < 0.2 or k in (1, n):  # nothing to move when every step or only step 0 runs
            return steps, rng.choice([o for o in ORDERS if o != order])
        out = set(steps)
        out.remove(rng.choice(sorted(out - {0})))
        out.add(rng.choice([s for s in range(1, n) if s not in out]))
        return frozenset(out), order

    state = (_even(n, k), 1)
    current = score(*state)
    moves = accepted = stale = 0
    while current is not None and stale < STALE:
        proposal = neighbour(*state)
        known = proposal in scored
        value = score(*proposal)
        if value is None:  # the budget cannot pay for another evaluation
            break
        stale = stale + 1 if known else 0
        moves += 1
        progress = r.used / max(r.budget, 1e-9)
        temperature = START_TEMPERATURE * max(0.0, 1.0 - progress / ANNEAL_SHARE)
        delta = value - current
        if delta >= 0 or (temperature > 0 and rng.random() < math.exp(delta / temperature)):
            state, current = proposal, value
            accepted += 1
    return {"searcher": "anneal", "moves": moves, "accepted": accepted, "scored": len(scored)}
