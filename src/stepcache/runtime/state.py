"""Per-generation state: step counting, rule caches and statistics. Made fresh per generation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Stats:
    steps: int = 0  # denoiser calls
    computed: int = 0  # calls where every row ran every block
    estimated: int = 0  # calls answered entirely without the network
    partial: int = 0  # calls where only part of the network (or of the batch) ran
    cfg_skipped: int = 0  # unconditional rows (one per sample and step) not computed
    fallbacks: int = 0  # estimates rejected by the guard and computed instead
    cache_bytes: int = 0  # tensor bytes the rules' caches held when the generation ended
    actions: list[str] = field(default_factory=list)  # per call: C / E / P / G
    row_actions: list[str] = field(default_factory=list)  # per call, one letter per batch row

    def record(self, rows: list[str]) -> None:
        letters = set(rows)
        if len(letters) == 1:
            action = letters.pop()
        elif letters == {"C", "G"}:
            action = "G"  # the whole network ran, only on fewer unconditional rows
        else:
            action = "P"
        self.steps += 1
        self.actions.append(action)
        self.row_actions.append("".join(rows))
        if action == "C":
            self.computed += 1
        elif action == "E":
            self.estimated += 1
        else:  # "P", "G" (and a lone "G" row cannot happen: its conditional pair ran)
            self.partial += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "computed": self.computed,
            "estimated": self.estimated,
            "partial": self.partial,
            "cfg_skipped": self.cfg_skipped,
            "fallbacks": self.fallbacks,
            "cache_bytes": self.cache_bytes,
            "actions": list(self.actions),
            "row_actions": list(self.row_actions),
        }


@dataclass
class ModuleCache:
    """The runtime's own cache for the module-output rules (DeepCache, FORA), per branch: the
    replayed modules' outputs and the skipped modules' output shapes, by (module, call in forward)."""

    outputs: dict[tuple[int, int], Any] = field(default_factory=dict)
    shapes: dict[tuple[int, int], Any] = field(default_factory=dict)
    ready: bool = False  # a full call has filled it


@dataclass
class CallScratch:
    """What the block hooks of one denoiser call share."""

    ctx: Any
    state: dict[str, Any] | None  # the block rule's state for this branch
    span: tuple[int, int] | None
    rows: torch.Tensor | None  # full-batch rows running in this call
    row_actions: list[str]
    head_in: tuple | None = None
    mid_in: tuple | None = None
    skipping: bool = False  # linear stack: the middle is being skipped; U-Net: the deep branch
    next_block: int = 0  # linear stack: the block the model must call next
    module_calls: dict[int, int] = field(default_factory=dict)  # module caches: calls so far
    modules: ModuleCache | None = None  # module caches: this branch's cached outputs
    token_span: Any = None  # token caching: the span running now (blocks._TokenSpan)


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors reachable through dicts, lists, tuples and dataclasses (the
    rules' typed states)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


class Generation:
    """One sampling run. Counts steps; keeps one cache per (branch, level)."""

    def __init__(
        self,
        num_steps: int | None,
        calls_per_step: int | None,
        cfg_layout: str | None,
        cfg_calls: str | None = None,
    ):
        self.num_steps = num_steps
        # None: a pipeline's progress bar advances the step; an int: every that many calls do.
        self.calls_per_step = calls_per_step
        self.cfg_layout = cfg_layout  # where batched CFG puts the unconditional half
        # How guidance reaches the denoiser: "batched" (one call, two halves), "separate" (a
        # conditional call, then an unconditional one), "auto" (told by the calls of step 0),
        # or None (not said: a family's rows may still identify themselves, e.g. DiT's labels).
        self.cfg_calls = cfg_calls
        self.step0_calls = 0
        self.halves_equal = False  # "auto": step 0's first call carried one sample twice (batched CFG)
        self.cfg_said = False  # "auto": the pipeline said it runs CFG, but not how (one call: batched)
        # network evaluations per scheduler step (Heun: 2): each is a call, or a cond/uncond pair
        self.scheduler_order = 1
        # this step's last conditional output when guidance runs as separate calls:
        # (step, branch, output, rows the network answered)
        self.cond_out: tuple[int, int, torch.Tensor, torch.Tensor] | None = None
        self.step = 0
        self.branch = -1
        self.calls = 0
        self.rule_states: dict[tuple[int, str], Any] = {}
        self.templates: dict[int, Any] = {}  # last real output object per branch
        self.signature: dict[int, tuple] = {}  # batch shape per branch, to catch a changed input
        self.stats = Stats()
        self.call: CallScratch | None = None
        # (step, device bool "the network's own output was finite"), read once at the end
        self.finite: list[tuple[int, torch.Tensor]] = []
        # device counts of rows the guard sent back to compute, read with ``finite`` at the end
        self.deferred_fallbacks: list[torch.Tensor] = []
        # Per (branch, level[, span]): per stream, the largest per-row norm of the real outputs
        # (or residuals) the rule has observed; the guard bounds estimates by it. On the device.
        self.peaks: dict[tuple, tuple[torch.Tensor | None, ...]] = {}
        self.estimated_steps: list[int] = []  # steps where some row was not computed in full

    def next_call(self) -> tuple[int, int]:
        if self.calls_per_step is not None:
            self.step, self.branch = divmod(self.calls, self.calls_per_step)
        else:
            self.branch += 1
        self.calls += 1
        return self.step, self.branch

    def cfg_mode(self, step: int) -> str | None:
        """ "batched", "separate" or None for the calls of ``step``. "auto" decides from step 0:
        separate once it has made two calls per network evaluation (its first conditional call is
        kept for pairing), else batched where its first call carried one sample twice (the layout
        must allow it), else batched where the pipeline said CFG, else none."""
        if self.cfg_calls != "auto":
            return self.cfg_calls
        if self.step0_calls >= 2 * self.scheduler_order:
            return "separate"
        if self.halves_equal:
            return "batched"
        if step == 0:
            return "undecided"
        return "batched" if self.cfg_said else None

    def advance_step(self, step: int | None = None) -> None:
        self.step = self.step + 1 if step is None else step
        self.branch = -1

    def state_for(self, branch: int, level: str, rule: Any) -> Any:
        key = (branch, level)
        if key not in self.rule_states:
            self.rule_states[key] = rule.new_state()
        return self.rule_states[key]

    def module_cache(self, branch: int) -> ModuleCache:
        key = (branch, "modules")
        if key not in self.rule_states:
            self.rule_states[key] = ModuleCache()
        return self.rule_states[key]

    def token_cache(self, branch: int) -> dict[Any, torch.Tensor]:
        """Token caching: every self-attention layer's keys and values, per branch."""
        key = (branch, "tokens")
        if key not in self.rule_states:
            self.rule_states[key] = {}
        return self.rule_states[key]

    def reset_branch(self, branch: int) -> None:
        for key in [k for k in self.rule_states if k[0] == branch]:
            del self.rule_states[key]
        for key in [k for k in self.peaks if k[0] == branch]:
            del self.peaks[key]
        self.templates.pop(branch, None)
