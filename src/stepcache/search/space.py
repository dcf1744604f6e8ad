"""One point of the search space, and the policy it stands for.

A candidate fixes, jointly: how many steps run the network (``computed``) and which (the planner's
answer for that count, or with a ``stride`` the peers' placement: the first steps, then every
``stride``-th), the extrapolation order of the others and its form (the polynomial through the
points, TaylorSeer's expansion, or weights fitted to the calibration trajectory while the
candidate is evaluated: ``search.fit``) and how far it moves from the last computed output
(``damping``), and per step the guidance mode:
full guidance for the first ``cfg_full`` fraction of the steps, then either the cached guidance
direction refreshed every ``cfg_interval``-th computed step (``estimated``) or the conditional
pass alone (``cond-only``); and, on models with a block stack, a block level on the computed
steps: dbcache's span (``block_fn`` leading and ``block_bn`` trailing blocks always run; 0 leading
blocks means no block rule) and its threshold. A candidate may instead fix the ``partial`` steps:
computed steps that run only the span's ends and reuse the middle's residual of the last full step
(the ECAD-style baseline's per-step x per-block masks, one contiguous span).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .. import presets
from ..policy import Policy, compose

CFG_MODES = ("estimated", "cond-only")
EXPANSIONS = ("polynomial", "taylor", "fitted")  # fitted: weights fitted on the calibration run
STRIDES = (0, 2, 3, 4, 6)  # 0: the planner's placement; else the first steps, then every stride-th
DAMPINGS = (1.0, 0.75, 0.5)  # the forecast's step from the last computed output, as a fraction


@dataclass(frozen=True)
class Candidate:
    computed: int
    order: int
    cfg_full: float = 1.0
    cfg_mode: str = "estimated"
    cfg_interval: int = 2
    block_fn: int = 0
    block_bn: int = 0
    block_threshold: float = 0.1
    partial: tuple[int, ...] = ()
    stride: int = 0  # 0: the planner's placement of the computed steps; else see strided_mask
    # the forecast of skipped steps: "polynomial", TaylorSeer's "taylor", or "fitted" (search.fit)
    expansion: str = "polynomial"
    damping: float = 1.0  # how far that forecast moves from the last computed output (1: all the way)

    def __post_init__(self) -> None:
        object.__setattr__(self, "partial", tuple(sorted(self.partial)))  # hashable when read from JSON

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # Stored candidates of the searchers without these knobs keep their keys.
        if not self.partial:
            del out["partial"]
        else:
            out["partial"] = list(self.partial)
        if not self.stride:
            del out["stride"]
        if self.expansion == "polynomial":
            del out["expansion"]
        if self.damping == 1.0:
            del out["damping"]
        return out

    @property
    def fitted(self) -> bool:
        """Whether evaluating it fits the forecast's weights (``Evaluator.evaluate(fit=True)``)."""
        return self.expansion == "fitted"

    def middle_fraction(self, num_blocks: int) -> float:
        """The share of the blocks a partial step skips, relative to skipping all but the first."""
        if self.block_fn == 0 or num_blocks < 2:
            return 0.0
        return max(0, num_blocks - self.block_fn - self.block_bn) / (num_blocks - 1)

    def full_until(self, num_steps: int) -> int:
        """Steps from the start with full guidance: at least step 0, whose pass the cache reuses."""
        return max(1, round(self.cfg_full * num_steps))

    def guidance_mask(self, mask: list[bool]) -> list[bool]:
        """Per step: True where both passes run. Counted over computed steps for ``cfg_interval``."""
        full_until = self.full_until(len(mask))
        out, seen = [], 0
        for s, computed in enumerate(mask):
            if s < full_until or self.cfg_mode == "cond-only":
                out.append(s < full_until)
                continue
            out.append(computed and seen % self.cfg_interval == 0)
            seen += computed
        return out

    def actions(self, mask: list[bool], cfg: bool) -> str:
        """The per-step actions this candidate takes: C, E (estimated), G (conditional pass only)."""
        if not cfg:
            return "".join("C" if m else "E" for m in mask)
        g = self.guidance_mask(mask)
        return "".join(("C" if gs else "G") if m else "E" for m, gs in zip(mask, g, strict=True))

    def policy(
        self, mask: list[bool], cfg: bool, name: str = "searched", weights: list[float] | None = None
    ) -> Policy:
        """The policy it stands for; a fitted candidate's ``weights`` come from its evaluation
        (before it, the polynomial forecast stands in, and the evaluation fits them)."""
        expansion = "polynomial" if self.fitted else self.expansion
        step = {"mask": list(mask), "order": self.order, "expansion": expansion, "damping": self.damping}
        if self.fitted and weights is not None:
            step["weights"] = list(weights)
        parts = [presets.get("schedule", **step)]
        if self.partial and self.block_fn > 0:
            full = [m and s not in self.partial for s, m in enumerate(mask)]
            parts.append(
                presets.get("taylorseer-feature", mask=full, order=0, fn=self.block_fn, bn=self.block_bn)
            )
        elif self.block_fn > 0:
            parts.append(
                presets.get("dbcache", fn=self.block_fn, bn=self.block_bn, threshold=self.block_threshold)
            )
        g = self.guidance_mask(mask)
        if cfg and not all(g):
            if self.cfg_mode == "cond-only":
                end = self.full_until(len(mask)) / len(mask)
                parts.append(presets.get("guidance-interval", start=0.0, end=end))
            else:
                parts.append(presets.get("cfg-cache", mask=g, warmup=0))
        if len(parts) == 1:
            return Policy.from_dict({**parts[0].to_dict(), "name": name})
        return compose(*parts, name=name)


def strided_mask(num_steps: int, computed: int, stride: int) -> list[bool]:
    """The placement the peers' fixed schedules use (TaylorSeer's warm-up then interval): the first
    ``w`` steps, then every ``stride``-th, with ``w`` the most that keeps ``computed`` steps (more
    when even ``w = 0`` computes more)."""
    best = [s % stride == 0 for s in range(num_steps)]
    for w in range(1, num_steps + 1):
        mask = [s < w or (s - w) % stride == 0 for s in range(num_steps)]
        if sum(mask) > computed:
            break
        best = mask
    return best


@dataclass(frozen=True)
class Dim:
    """One knob of the space. ``high`` may name a bound that depends on the run (``k_max``:
    the most computed steps that can meet the speed target; ``fn_max``: leading blocks)."""

    name: str
    kind: str  # "int", "float" or "cat"
    low: float = 0
    high: float | str = 0
    log: bool = False
    choices: tuple[Any, ...] = ()
    needs: str = ""  # "": always; "cfg": guidance is on; "blocks": a block stack; "block_rule": block_fn > 0


# The space, declared once: Optuna proposes from it and a fixed candidate is stored through it.
SPACE = (
    Dim("order", "int", 0, 2),
    Dim("expansion", "cat", choices=EXPANSIONS),
    Dim("damping", "cat", choices=DAMPINGS),
    Dim("computed", "int", 1, "k_max"),
    Dim("stride", "cat", choices=STRIDES),
    Dim("cfg_full", "float", 0.0, 1.0, needs="cfg"),
    Dim("cfg_mode", "cat", choices=CFG_MODES, needs="cfg"),
    Dim("cfg_interval", "int", 1, 6, needs="cfg"),
    Dim("block_fn", "int", 0, "fn_max", needs="blocks"),  # 0: no block rule
    Dim("block_bn", "int", 0, 1, needs="block_rule"),
    Dim("block_threshold", "float", 0.03, 0.5, log=True, needs="block_rule"),
)


@dataclass(frozen=True)
class Bounds:
    """What the space depends on for one search."""

    k_max: int
    cfg: bool
    num_blocks: int

    def active(self, dim: Dim, values: dict[str, Any]) -> bool:
        if dim.needs == "cfg":
            return self.cfg
        if dim.needs == "blocks":
            return self.num_blocks >= 2
        if dim.needs == "block_rule":
            return self.num_blocks >= 2 and values.get("block_fn", 0) > 0
        return True

    def high(self, dim: Dim) -> float:
        named = {"k_max": self.k_max, "fn_max": min(2, self.num_blocks - 1)}
        return named[dim.high] if isinstance(dim.high, str) else dim.high


def suggest(trial: Any, bounds: Bounds) -> Candidate:
    """The candidate an Optuna trial proposes (or was enqueued with)."""
    values: dict[str, Any] = {}
    for dim in SPACE:
        if not bounds.active(dim, values):
            continue
        if dim.kind == "int":
            values[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(bounds.high(dim)))
        elif dim.kind == "float":
            values[dim.name] = trial.suggest_float(dim.name, dim.low, bounds.high(dim), log=dim.log)
        else:
            values[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
    return Candidate(**values)


def params(cand: Candidate, bounds: Bounds) -> dict[str, Any]:
    """A candidate as the trial parameters ``suggest`` reads back (to enqueue it)."""
    values: dict[str, Any] = {}
    for dim in SPACE:
        if bounds.active(dim, values):
            values[dim.name] = getattr(cand, dim.name)
    return values


@dataclass
class Point:
    """One evaluated candidate: its schedule, what it did per step (and per row), its
    calibration PSNR (mean, and median over the seeds) and adherence, its FLOP speedup, and what
    evaluating it cost."""

    candidate: Candidate
    psnr: float
    speedup: float
    actions: str
    mask: list[bool]
    cost: float = 0.0
    row_actions: list[str] = field(default_factory=list)
    adherence: float | None = None
    psnr_median: float | None = None  # None: a point stored before medians were kept
    weights: list[float] | None = None  # a fitted candidate's forecast weights

    def policy(self, cfg: bool, name: str = "searched") -> Policy:
        return self.candidate.policy(self.mask, cfg, name=name, weights=self.weights)

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.as_dict(),
            "psnr": self.psnr,
            "speedup": self.speedup,
            "actions": self.actions,
            "mask": list(self.mask),
            "cost": self.cost,
            "row_actions": list(self.row_actions),
            "adherence": self.adherence,
            "psnr_median": self.psnr_median,
            **({"weights": list(self.weights)} if self.weights is not None else {}),
        }
