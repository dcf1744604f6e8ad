"""The step and guidance levels: each a small driver that turns its rule's answer into a plain
per-call plan value (:class:`StepCall`, :class:`GuidanceCall`), fills the rows the plan leaves
out, and lets the rule observe the rows that ran. The handle only puts them in order around the
real forward (the block level runs inside it: ``blocks.py``)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .interfaces import CallContext, GuidanceRule, StepRule
from .rows import _finite, _first, _global_rows, _raise_peaks, _resolve, _tie_cfg_pairs
from .state import Generation

if TYPE_CHECKING:
    from .engine import Handle


@dataclass
class StepCall:
    """The step rule's plan for one call: the rows the network answers, the others' estimate."""

    state: Any
    run: torch.Tensor | None = None  # bool over the batch (host); None = every row
    est: torch.Tensor | None = None
    est_rows: torch.Tensor | None = None  # the estimated rows; None with an estimate = all
    letter: str = "E"  # what an estimated row did: "E" nothing, "P" a cheaper network ran
    ran: list[Any] = field(default_factory=list)  # what the estimate ran (run_at, run_model)

    @property
    def runs_nothing(self) -> bool:
        return self.run is not None and not bool(self.run.any())


@dataclass
class GuidanceCall:
    """The guidance decision of one call; index tensors live on the host."""

    state: dict[str, Any]
    uncond: torch.Tensor  # batch rows of the unconditional half, pair order
    cond: torch.Tensor  # batch rows of the conditional half, pair order
    both: torch.Tensor  # pairs whose two rows both run
    dropped: torch.Tensor  # pairs whose unconditional row is left out
    # the conditional output when it came from an earlier call of the step (separate CFG calls);
    # None: the conditional rows are in this call's output
    cond_source: torch.Tensor | None = None
    ctx: CallContext | None = None  # the rule's view of the call, when it differs from the call's


class StepDriver:
    """A step rule over whole calls: which rows the network answers; the others it estimates."""

    def __init__(self, handle: Handle, rule: StepRule):
        self.handle = handle
        self.rule = rule

    def plan(
        self, gen: Generation, ctx: CallContext, bound: inspect.BoundArguments, first: bool, device: Any
    ) -> StepCall:
        """The rows the network answers, and the others' estimate, which the guard checks in one
        host read (a rejected estimate: every row computes)."""
        handle, rule = self.handle, self.rule
        call = StepCall(gen.state_for(ctx.branch, "step", rule))
        plan = handle._agreed(_tie_cfg_pairs(rule.plan(ctx, call.state), ctx), device)
        compute_all, compute_none, mask = _resolve(
            True if first and not getattr(rule, "answers_first", False) else plan, ctx.batch
        )
        if compute_all:
            return call
        est_rows = None if compute_none else _global_rows(None, ~mask, device)
        # Only an estimate may run the network another way (CallContext.run_at, run_model).
        template = gen.templates.get(ctx.branch)
        ctx._run_at = lambda scale, rows: handle._run_at(bound, ctx.batch, scale, rows, call.ran)
        ctx._run_model = lambda module, rows: handle._run_model(
            bound, ctx.batch, module, rows, call.ran, template
        )
        est = rule.estimate(ctx, call.state, est_rows)
        ctx._run_at = ctx._run_model = None
        # None: the rule's own validation rejected its estimate.
        usable = est is not None and (
            not handle.rules.guard or handle._usable(gen, (ctx.branch, "step"), (est,), est_rows)
        )
        if not handle._all_ranks(usable, device):
            gen.stats.fallbacks += 1
            return call
        call.run = torch.zeros(ctx.batch, dtype=torch.bool) if compute_none else mask.cpu()
        call.est, call.est_rows = est, est_rows
        call.letter = "P" if call.ran else "E"  # a cheaper network ran: partial work, not none
        return call

    def fill(self, call: StepCall, full: torch.Tensor, row_actions: list[str]) -> None:
        """The estimated rows of a call where some rows ran."""
        if call.est_rows is not None:
            full.index_copy_(0, call.est_rows, call.est.to(full.dtype))
            for r in call.est_rows.tolist():
                row_actions[r] = call.letter

    def observe(
        self, gen: Generation, ctx: CallContext, call: StepCall, full: torch.Tensor, device: Any
    ) -> None:
        """The rule sees the rows the network answered (the guard records their norms)."""
        rows = None if call.run is None else _global_rows(None, call.run, device)
        seen = full if rows is None else full.index_select(0, rows)
        self.rule.observe(ctx, call.state, seen, rows)
        if self.handle.rules.guard:
            key = (ctx.branch, "step")
            gen.peaks[key] = _raise_peaks(gen.peaks.get(key), (seen,), rows, ctx.batch)


class GuidanceDriver:
    """A guidance rule over CFG pairs: which unconditional rows of computed pairs are left out,
    on batched CFG (two halves of one call) or on separate calls (conditional, then unconditional)."""

    def __init__(self, handle: Handle, rule: GuidanceRule):
        self.handle = handle
        self.rule = rule

    def plan(
        self, gen: Generation, ctx: CallContext, mode: str | None, step_run: torch.Tensor | None
    ) -> GuidanceCall | None:
        """This call's decision, or None where no pair is a candidate. Only pairs whose two rows
        both run are candidates (the others are the step rule's)."""
        if mode == "separate":
            return self._separate(gen, ctx, step_run) if ctx.branch % 2 else None
        return self._batched(gen, ctx, step_run)

    def _batched(
        self, gen: Generation, ctx: CallContext, step_run: torch.Tensor | None
    ) -> GuidanceCall | None:
        """The pairs of one call. One host sync: the unconditional mask (and a tensor plan) are
        read on the host."""
        mask = ctx.uncond_rows()
        if mask is None:
            return None  # no batched CFG in this call
        mask = mask.reshape(-1).cpu()
        uncond = torch.nonzero(mask).reshape(-1)
        cond = torch.nonzero(~mask).reshape(-1)
        if uncond.numel() == 0 or uncond.numel() != cond.numel():
            return None
        state = gen.state_for(ctx.branch, "guidance", self.rule)
        pairs = uncond.numel()
        both = torch.ones(pairs, dtype=torch.bool)
        if step_run is not None:
            both = step_run[uncond] & step_run[cond]
        dropped = self._dropped(self.rule.plan(ctx, state), both)
        return GuidanceCall(state, uncond, cond, both, dropped)

    def _separate(
        self, gen: Generation, ctx: CallContext, step_run: torch.Tensor | None
    ) -> GuidanceCall | None:
        """The unconditional call (odd branch) of a step whose conditional call (the branch
        before it) came first: its rows pair with that call's rows, one to one; only pairs whose
        two rows the network answers are candidates. The rule sees pairs as on batched CFG
        (``ctx.batch`` is both calls' rows). A second-order scheduler's second evaluation is
        another such pair of calls (branches 2 and 3)."""
        if gen.cond_out is None or gen.cond_out[:2] != (ctx.step, ctx.branch - 1):
            return None
        _, pair_branch, cond, answered = gen.cond_out
        if cond.shape[0] != ctx.batch:
            return None  # the two calls are not one pair per row
        pair_ctx = CallContext(**{**ctx.__dict__, "batch": 2 * ctx.batch, "branch": pair_branch})
        state = gen.state_for(pair_branch, "guidance", self.rule)
        both = answered.clone() if step_run is None else answered & step_run
        dropped = self._dropped(self.rule.plan(pair_ctx, state), both)
        rows = torch.arange(ctx.batch)
        return GuidanceCall(state, rows, rows, both, dropped, cond_source=cond, ctx=pair_ctx)

    def _dropped(self, plan: Any, both: torch.Tensor) -> torch.Tensor:
        keep_all, keep_none, keep = _resolve(self.handle._agreed(plan), both.numel())
        if keep_all:
            return torch.zeros(both.numel(), dtype=torch.bool)
        return both.clone() if keep_none else both & ~keep.cpu()

    def finish(
        self,
        gen: Generation,
        ctx: CallContext,
        bound: inspect.BoundArguments,
        guide: GuidanceCall,
        full: torch.Tensor,
        row_actions: list[str],
    ) -> None:
        """Fill the left-out unconditional rows from the rule's estimate; let it observe the rest."""
        handle, rule = self.handle, self.rule
        device = full.device
        source = full if guide.cond_source is None else guide.cond_source
        pair_ctx = guide.ctx or ctx
        pair_idx = torch.arange(guide.uncond.numel())
        if bool(guide.dropped.any()):
            pairs = pair_idx[guide.dropped].to(device)
            u_rows = guide.uncond[guide.dropped].to(device)
            cond = source.index_select(0, guide.cond[guide.dropped].to(device))
            est = rule.estimate(pair_ctx, guide.state, cond, pairs)
            usable = est is not None and (not handle.rules.guard or _finite((est,)))
            if not handle._all_ranks(usable, device):
                gen.stats.fallbacks += 1
                rows_call = handle.adapter.slice_rows(bound, u_rows, ctx.batch)
                full.index_copy_(0, u_rows, _first(handle._run(gen, ctx, rows_call, u_rows, row_actions)))
                guide.dropped[:] = False
            else:
                full.index_copy_(0, u_rows, est.to(full.dtype))
                for r in u_rows.tolist():
                    row_actions[r] = "G"
                gen.stats.cfg_skipped += len(u_rows)
        observed = guide.both & ~guide.dropped
        if bool(observed.any()):
            rule.observe(
                pair_ctx,
                guide.state,
                source.index_select(0, guide.cond[observed].to(device)),
                full.index_select(0, guide.uncond[observed].to(device)),
                pair_idx[observed].to(device),
            )
