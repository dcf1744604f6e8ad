"""The planner: which K of N steps to compute so that answering the others from cache costs least.

From reference trajectories, ``SegmentErrors`` replays every span "compute step i, then estimate
steps i+1..j-1" (estimates extrapolated from the last computed outputs, as the ``schedule``
method does) and measures how far the sample at step j lands from the reference. ``plan`` then
picks the schedule with the least total error for a compute budget of K steps by dynamic
programming over (previous computed step, last computed step), exact for orders 0 and 1; it is
checked against brute force in the tests. The error is additive over spans, as in LeMiCa.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from ..methods.maths import lagrange_weights
from .trajectory import Trajectory

ErrorFn = Callable[[int, int, int], float]  # (previous computed or -1, computed, next computed or N)


class SegmentErrors:
    """``errors(p, i, j)``: mean squared deviation at step j of the sample after computing at step
    i and extrapolating (order 0 or 1, through p and i) up to j; memoised per (p, i)."""

    def __init__(self, traj: Trajectory, order: int):
        if order not in (0, 1):
            raise ValueError(f"order: the planner is exact for orders 0 and 1, got {order}")
        self.traj, self.order = traj, order
        self._rows: dict[tuple[int, int], list[float]] = {}

    def _sweep(self, p: int, i: int) -> list[float]:
        tr = self.traj
        n = tr.num_steps
        x = tr.x[i].clone()
        state = tr.start(i)
        out = [0.0] * (n + 1)
        for s in range(i, n):
            if s == i or self.order == 0 or p < 0:
                v = tr.v[i]
            else:
                wp, wi = lagrange_weights([float(tr.t[p]), float(tr.t[i])], float(tr.t[s]))
                v = wp * tr.v[p] + wi * tr.v[i]
            x = tr.advance(state, s, x, v)
            out[s + 1] = float(((x - tr.x[s + 1]) ** 2).mean())
        return out

    def __call__(self, p: int, i: int, j: int) -> float:
        key = (p if self.order == 1 else -1, i)
        if key not in self._rows:
            self._rows[key] = self._sweep(*key)
        return self._rows[key][j]


def plan(errors: ErrorFn, num_steps: int, computed: int) -> tuple[list[bool], float]:
    """The compute mask with exactly ``computed`` steps (step 0 always) of least total error."""
    n, k = num_steps, computed
    if not 1 <= k <= n:
        raise ValueError(f"computed: must lie in [1, {n}], got {k}")
    # layer[(p, i)] = (least error so far, back pointer), with p the computed step before i
    layers: list[dict[tuple[int, int], tuple[float, tuple[int, int] | None]]] = [{(-1, 0): (0.0, None)}]
    for c in range(2, k + 1):
        layer: dict[tuple[int, int], tuple[float, tuple[int, int] | None]] = {}
        last_allowed = n - 1 - (k - c)  # leave room for the computed steps still to place
        for (p, i), (cost, _) in layers[-1].items():
            for j in range(i + 1, last_allowed + 1):
                value = cost + errors(p, i, j)
                if (i, j) not in layer or value < layer[(i, j)][0]:
                    layer[(i, j)] = (value, (p, i))
        layers.append(layer)
    total, state = min(
        ((cost + errors(p, i, n), (p, i)) for (p, i), (cost, _) in layers[-1].items()),
        key=lambda item: item[0],
    )
    steps = []
    node: tuple[int, int] | None = state
    for layer in reversed(layers):
        assert node is not None
        steps.append(node[1])
        node = layer[node][1]
    mask = [False] * n
    for s in steps:
        mask[s] = True
    return mask, total


def brute_force(errors: ErrorFn, num_steps: int, computed: int) -> tuple[list[bool], float]:
    """``plan`` by enumeration, for tests: every choice of the computed steps after step 0."""
    best: tuple[list[bool], float] | None = None
    for rest in itertools.combinations(range(1, num_steps), computed - 1):
        steps = [0, *rest]
        total, prev = 0.0, -1
        for a, b in zip(steps, [*steps[1:], num_steps], strict=True):
            total += errors(prev, a, b)
            prev = a
        if best is None or total < best[1]:
            best = ([s in steps for s in range(num_steps)], total)
    assert best is not None
    return best
