"""The runtime: one wrapper on the denoiser's forward, one per block, one on the pipeline's
progress bar. All are instance attributes (never class patches) and ``disable`` deletes them.

Per call the denoiser wrapper asks the step rule which rows to compute, runs those rows (all,
none, or a gathered subset), and the block wrappers ask the block rule whether the middle of
the stack runs. Every cache lives in a :class:`Generation` made at the start of a generation
and dropped at its end, including when it raises.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import inspect
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter
from ..errors import UnsupportedModelError
from .interfaces import (
    BranchRule,
    CallContext,
    PerBlockRule,
    RuleSet,
    Streams,
    TokenRule,
    gather_tokens,
    put,
    scatter_tokens_,
    take,
    take_streams,
)
from .ranks import Agreement, agreement_for
from .state import CallScratch, Generation, tensor_bytes

_HANDLES: weakref.WeakKeyDictionary[nn.Module, Handle] = weakref.WeakKeyDictionary()
_CFG_LAYOUTS = (None, "uncond_first", "uncond_last", "separate")
# The guard's range: an estimate whose per-row norm exceeds this many times the largest norm of
# the real outputs (or residuals) its rule has observed for that row is rejected. Sound
# extrapolation stays near 1x (1.2x at most across the presets on the zoo models); runaway
# high-order extrapolation over long intervals reaches 5-30x within one interval and then
# drives the latent to overflow. 4x sits between the two.
GUARD_RANGE = 4.0


def _resolve(plan: Any, active: int) -> tuple[bool, bool, torch.Tensor | None]:
    """(compute_all, compute_none, local mask). One host sync when the plan is a tensor."""
    if isinstance(plan, bool):
        return plan, not plan, None
    mask = plan.to(torch.bool).reshape(-1)
    if mask.numel() != active:
        raise RuntimeError(f"rule returned a plan for {mask.numel()} rows, the call has {active}")
    n = int(mask.sum().item())
    return n == active, n == 0, mask


def _tie_cfg_pairs(plan: Any, ctx: CallContext) -> Any:
    """One decision per sample: under batched CFG a sample is two rows, the k-th unconditional
    row and the k-th conditional one (as the guidance rules pair them), and both run when the
    rule wants either. A pair split between a fresh and a stale row turns the stale row's error
    into a guidance-scaled error of the guidance direction. Rows outside ``ctx.rows`` keep their
    partner's decision; a row without a partner keeps its own. On the device, no host sync."""
    if not isinstance(plan, torch.Tensor):
        return plan
    mask = ctx.uncond_rows()
    if mask is None:
        return plan
    wanted = plan.to(torch.bool).reshape(-1)
    device = wanted.device
    rows = torch.arange(ctx.batch, device=device) if ctx.rows is None else ctx.rows.to(device)
    if rows.numel() != wanted.numel():
        return plan  # a plan of the wrong size, which _resolve reports
    mask = mask.reshape(-1).to(device)
    pair = torch.where(mask, mask.cumsum(0) - 1, (~mask).cumsum(0) - 1)
    full = torch.zeros(ctx.batch, dtype=torch.int8, device=device)
    full[rows] = wanted.to(torch.int8)
    either = torch.zeros_like(full).scatter_reduce(0, pair, full, reduce="amax")
    return either[pair][rows].to(torch.bool)


def _global_rows(rows: torch.Tensor | None, local: torch.Tensor, device: torch.device) -> torch.Tensor:
    idx = torch.nonzero(local, as_tuple=False).reshape(-1).to(device)
    return idx if rows is None else rows.index_select(0, idx)


def as_batch(value: Any) -> torch.Tensor | None:
    """A batch as one tensor: the tensor itself, or a list of per-sample tensors of one shape
    stacked (Z-Image takes and returns its latents so); None for anything else."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        if len({(v.shape, v.dtype, v.device) for v in value}) == 1:
            return torch.stack(value)
    return None


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    first = out if isinstance(out, list) else out[0]
    stacked = as_batch(first) if isinstance(first, list) else None
    return first if stacked is None else stacked


def _output_tensor(out: Any, model: nn.Module) -> torch.Tensor:
    """The denoiser's output tensor: the output itself, or the first item of a tuple or of a
    diffusers output; anything else is a model stepcache cannot stand in for."""
    try:
        first = _first(out)
    except (TypeError, KeyError, IndexError):
        first = None
    if not isinstance(first, torch.Tensor):
        raise UnsupportedModelError(
            f"{type(model).__name__} returned {type(out).__name__}, not a tensor (or a tuple or diffusers "
            "output whose first item is one), so stepcache cannot stand in for its output; stepcache "
            "was disabled on it"
        )
    return first


def _replace_first(template: Any, tensor: torch.Tensor) -> Any:
    def like(old: Any) -> Any:  # per-sample lists stay lists
        return list(tensor.unbind(0)) if isinstance(old, list) else tensor

    if isinstance(template, (torch.Tensor, list)):
        return like(template)
    if isinstance(template, tuple):
        return (like(template[0]), *template[1:])
    keys = list(template.keys())
    return type(template)(**{k: (like(template[k]) if k == keys[0] else template[k]) for k in keys})


def _settle(gen: Generation, methods: str) -> None:
    """Read what was kept on the device during the generation, in one host sync: whether the
    network's own outputs were finite, and the guard's deferred fallbacks (added to the stats).

    The guard replaces bad estimates, but the network's own non-finite output is left as is,
    and said once per generation with the steps where it happened: blamed on the model only
    when no estimate came before it (otherwise the estimates may have fed it a broken latent)."""
    if not gen.finite and not gen.deferred_fallbacks:
        return
    device = (gen.finite[0][1] if gen.finite else gen.deferred_fallbacks[0]).device
    flags = [flag.to(device, torch.long).reshape(1) for _, flag in gen.finite]
    counts = [n.to(device, torch.long).reshape(1) for n in gen.deferred_fallbacks]
    values = torch.cat(flags + counts).cpu().tolist()  # the one host sync
    ok, fallbacks = values[: len(flags)], values[len(flags) :]
    gen.stats.fallbacks += sum(fallbacks)
    bad = sorted({step for (step, _), fine in zip(gen.finite, ok, strict=True) if not fine})
    gen.finite.clear()
    gen.deferred_fallbacks.clear()
    if bad:
        warnings.warn(_not_finite_message(bad, gen.estimated_steps, methods), RuntimeWarning, stacklevel=3)


def _not_finite_message(bad: list[int], estimated: list[int], methods: str) -> str:
    steps = f"step {bad[0]}" + (f" (and steps {bad[1:]})" if len(bad) > 1 else "")
    before = sorted({s for s in estimated if s < bad[0]})
    if not before:
        return (
            f"stepcache: the model's own output was not finite at {steps}; "
            "stepcache leaves it as it is (it only replaces its own estimates)"
        )
    return (
        f"stepcache: the denoiser's output was not finite at {steps}, after {methods} estimated "
        f"steps {before}: those estimates likely drove the latent out of range (try a shorter "
        "interval or a lower order); stepcache leaves the output as it is"
    )


def _finite(streams: tuple) -> bool:
    flags = [torch.isfinite(s).all() for s in streams if s is not None]
    return not flags or bool(torch.stack(flags).all())  # one host sync however many streams


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """Per row, the L2 norm in float32: non-finite where the row is (or overflows)."""
    flat = x.detach().flatten(1) if x.dim() > 1 else x.detach().reshape(-1, 1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)


def _rows_usable(streams: Streams, peaks: Streams | None, rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per row, on the device: every stream of that row's estimate is finite and, where the
    rule has observed that row, within GUARD_RANGE times the largest norm it observed there.

    ``rows``: the full-batch rows the estimate is for (None: all); ``n``: how many."""
    flags = []
    for i, s in enumerate(streams):
        if s is None:
            continue
        norm = _row_norms(s)
        ok = torch.isfinite(norm)
        peak = None if peaks is None else peaks[i]
        if peak is not None:
            rows_here = None if rows is None else rows.to(peak.device)
            ok = ok & (norm <= GUARD_RANGE * take(peak, rows_here))
        flags.append(ok)
    return torch.stack(flags).all(0) if flags else torch.ones(n, dtype=torch.bool)


def _raise_peaks(old: Streams | None, seen: Streams, rows: torch.Tensor | None, batch: int) -> Streams:
    """``old`` with the per-row norms of ``seen`` (real outputs of ``rows``) folded in by max."""
    out = []
    for i, s in enumerate(seen):
        prev = None if old is None else old[i]
        if s is None:
            out.append(prev)
            continue
        norm = _row_norms(s)
        if prev is None:
            prev = torch.zeros(batch, dtype=torch.float32, device=norm.device)
        if rows is None:
            out.append(torch.maximum(prev, norm))
        else:
            rows = rows.to(prev.device)
            out.append(prev.index_copy(0, rows, torch.maximum(prev.index_select(0, rows), norm)))
    return tuple(out)


def _add(a: Streams, b: Streams) -> Streams:
    return tuple(None if (x is None or y is None) else x + y for x, y in zip(a, b, strict=True))


def _sub(a: Streams, b: Streams) -> Streams:
    return tuple(None if (x is None or y is None) else x - y for x, y in zip(a, b, strict=True))


def _scatter(full: Streams, rows: torch.Tensor, part: Streams) -> Streams:
    out = []
    for f, p in zip(full, part, strict=True):
        if f is None or p is None:
            out.append(f)
        else:
            f = f.clone()
            f.index_copy_(0, rows, p)
            out.append(f)
    return tuple(out)


@dataclass
class _GuidanceCall:
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


class Handle:
    """What ``enable`` returns: statistics, a generation scope for bare loops, and ``disable``.

    Enabling the same model again replaces this handle: it then refuses ``stats`` and
    ``generation``, and its ``disable`` leaves the replacement in place. While enabled, a deep
    copy of the pipeline or module is a plain one (stepcache not enabled on it), and pickling
    or a shallow ``copy.copy`` raises TypeError: disable first.
    """

    def __init__(
        self,
        target: Any,
        model: nn.Module,
        adapter: Adapter,
        rules: RuleSet,
        policy: Any,
        agreement: Agreement | None = None,
    ):
        self.target = target
        self.agreement = agreement  # reduces every decision over the ranks of a split model
        self.model = model
        self.adapter = adapter
        self.rules = rules
        self.policy = policy
        self._local = threading.local()
        self._last_stats: dict[str, Any] | None = None
        self._warned_outside = False
        self._installed: list[tuple[Any, str, bool, Any]] = []  # (object, attr, had_own, own_value)
        self._sig = inspect.signature(model.forward)
        self._orig_forward = model.forward
        self._blocks: list[nn.Module] = []
        self._block_orig: list[Any] = []
        self._block_sig: list[inspect.Signature] = []
        self._replayed: set[int] = set()  # module caches: indices whose output is replayed
        self._attentions: list[list[nn.Module]] = []  # token caching: each block's self-attention
        self._compiled = False
        self._replaced = False  # a later enable on the same model took over

    # ---- public -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Statistics of the current generation, or of the last one that ended."""
        self._check_not_replaced("stats()")
        gen = self._current()
        if gen is not None:
            return gen.stats.as_dict()
        if self._last_stats is None:
            return Generation(None, 1, None).stats.as_dict()
        return dict(self._last_stats)

    @contextlib.contextmanager
    def generation(
        self, num_steps: int | None = None, calls_per_step: int = 1, cfg: str | None = None
    ) -> Iterator[Handle]:
        """Scope one sampling run of a bare denoiser in a hand-written loop.

        ``calls_per_step``: denoiser calls per step (2 when conditional and unconditional run as
        separate calls; each keeps its own cache). ``cfg``: where a batched CFG call keeps the
        unconditional half ("uncond_first" or "uncond_last"), "separate" when each step calls
        the conditional pass and then the unconditional one (``calls_per_step=2``), or None.
        """
        if num_steps is not None and (
            isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1
        ):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
            raise ValueError(f"calls_per_step must be a positive integer, got {calls_per_step!r}")
        if cfg not in _CFG_LAYOUTS:
            raise ValueError(f"cfg must be one of {_CFG_LAYOUTS}, got {cfg!r}")
        if cfg == "separate" and calls_per_step != 2:
            raise ValueError(
                f'cfg="separate" runs two calls per step: pass calls_per_step=2, got {calls_per_step}'
            )
        self._check_not_replaced("generation()")
        if cfg == "separate":
            gen = self._begin(Generation(num_steps, calls_per_step, None, "separate"))
        else:
            gen = self._begin(Generation(num_steps, calls_per_step, cfg, "batched" if cfg else None))
        try:
            yield self
        finally:
            self._end(gen)

    def disable(self) -> None:
        """Remove stepcache from the model; a no-op when this handle is no longer the model's
        current one (disabled already, or replaced: the replacement stays, with a warning)."""
        if self.active:
            detach(self.model)
        elif self._replaced:
            warnings.warn(
                "stepcache: this handle was replaced by a later enable() on the same model, so its "
                "disable() does nothing; call stepcache.disable(pipe) (or the new handle's disable()) "
                "to remove stepcache",
                RuntimeWarning,
                stacklevel=2,
            )

    def compile(self, **options: Any) -> Handle:
        """Compile the network with ``torch.compile(**options)``; the runtime itself stays eager.

        Traced, the runtime's per-generation Python state would be guarded on and recompiled
        every generation, and each host read would split the graph. So the runtime's entry points
        are kept out of dynamo, and only what they call is compiled: the denoiser's own forward,
        as one graph, or with a block-level rule each block's (decisions sit between blocks).
        Undone by ``disable``. Returns the handle.
        """
        self._check_not_replaced("compile()")
        if not self.active:
            raise RuntimeError("this handle is disabled; enable stepcache again, then compile")
        if self._compiled:
            raise RuntimeError("this handle is already compiled; disable and enable again to recompile")
        if self._blocks:
            self._block_orig = [torch.compile(f, **options) for f in self._block_orig]
            for blk in self._blocks:
                _set(self, blk, "forward", torch.compiler.disable(blk.forward))
        else:
            self._orig_forward = torch.compile(self._orig_forward, **options)
        _set(self, self.model, "forward", torch.compiler.disable(self.model.forward))
        self._compiled = True
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model (what a loop over a wrapped plain callable uses)."""
        return self.model(*args, **kwargs)

    @property
    def active(self) -> bool:
        return _HANDLES.get(self.model) is self

    def _check_not_replaced(self, what: str) -> None:
        if self._replaced:
            raise RuntimeError(
                f"stepcache: {what} on a stale handle: a later enable() on the same model replaced "
                "it; use the handle that call returned (or stepcache.runtime.handle_of(model))"
            )

    # ---- generation lifecycle -------------------------------------------------------------
    def _stack(self) -> list[Generation]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _current(self) -> Generation | None:
        stack = self._stack()
        return stack[-1] if stack else None

    def _begin(self, gen: Generation) -> Generation:
        self._stack().append(gen)
        return gen

    def _end(self, gen: Generation) -> None:
        stack = self._stack()
        if gen in stack:
            gen.stats.cache_bytes = tensor_bytes(gen.rule_states)
            stack.remove(gen)
            try:
                _settle(gen, self._methods())
            finally:
                self._last_stats = gen.stats.as_dict()
        gen.rule_states.clear()
        gen.templates.clear()
        gen.cond_out = None
        gen.peaks.clear()
        gen.call = None

    def _pipeline_cfg(self, caller_locals: dict[str, Any]) -> tuple[str | None, str | None]:
        """(batched layout, how guidance calls the denoiser) for the generation a pipeline opens.

        Pipelines say CFG as a property (SD3) or only as a local of ``__call__`` (PixArt; FLUX
        and Qwen-Image's ``do_true_cfg``), so read the locals of the frame that opened the
        progress bar first.
        """
        if caller_locals.get("do_true_cfg") is True:  # true CFG: a second call per step
            return None, "separate"
        do_cfg = caller_locals.get("do_classifier_free_guidance")
        if not isinstance(do_cfg, bool):
            do_cfg = getattr(self.target, "do_classifier_free_guidance", False)
        if do_cfg is not True:
            return None, None
        # A pipeline may declare its own layout (the zoo's class-conditional pipeline puts the
        # unconditional half last even around a U-Net); otherwise the family's convention.
        declared = getattr(type(self.target), "stepcache_cfg_layout", None)
        if declared in ("uncond_first", "uncond_last"):
            return declared, "batched"
        layout = self.adapter.pipeline_cfg_layout
        if self.adapter.family == "generic":  # unknown pipeline: step 0's calls tell
            return layout, "auto"
        return layout, "batched" if layout is not None else "separate"

    # ---- the denoiser call ----------------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        gen = self._current()
        if gen is None:
            if self.rules.step is not None or self.rules.block is not None:
                if not self._warned_outside:
                    self._warned_outside = True
                    warnings.warn(
                        "stepcache: denoiser called outside a generation, so it computes in full. "
                        "Enable the pipeline, or wrap a hand-written loop in `with handle.generation(...)`.",
                        stacklevel=2,
                    )
            return self._orig_forward(*args, **kwargs)
        try:
            return self._call(gen, args, kwargs)
        except UnsupportedModelError:
            # The model's call shape is one stepcache cannot handle: leave the model as it was.
            with contextlib.suppress(Exception):
                self._end(gen)
                detach(self.model)
            raise
        except BaseException:
            # A call that raised leaves no cache behind; its own error is the one to see.
            with contextlib.suppress(Exception):
                self._end(gen)
            raise

    def _call(self, gen: Generation, args: tuple, kwargs: dict) -> Any:
        adapter = self.adapter
        try:
            bound = self._sig.bind(*args, **kwargs)
            hidden = as_batch(bound.arguments[adapter.hidden_arg])
        except (TypeError, KeyError):
            # Arguments the model itself will reject: let it raise its own error.
            return self._orig_forward(*args, **kwargs)
        batch = adapter.batch_size(bound)
        if hidden is None:  # a sample that is no batch the adapter knows: the model's own error
            return self._orig_forward(*args, **kwargs)
        if self._blocks and adapter.needs_probe and not isinstance(self.rules.block, BranchRule):
            # once per enable: one plain call (the block hooks pass through outside a call)
            adapter.probe(
                self._blocks,
                self._block_sig,
                lambda: self._orig_forward(*bound.args, **bound.kwargs),
                batch,
            )
        step, branch = gen.next_call()
        signature = (tuple(hidden.shape), hidden.dtype, hidden.device)
        if gen.signature.get(branch, signature) != signature:
            gen.reset_branch(branch)  # new shape mid-generation: old caches do not apply
        gen.signature[branch] = signature
        if step == 0:
            gen.step0_calls = max(gen.step0_calls, branch + 1)
        mode = gen.cfg_mode(step)
        ctx = CallContext(
            step=step,
            branch=branch,
            num_steps=gen.num_steps,
            batch=batch,
            timestep=adapter.timestep(bound),
            _uncond=(lambda: adapter.uncond_rows(bound, gen.cfg_layout))
            if mode in (None, "batched")
            else None,
        )
        ran: list[Any] = []  # what the step rule's estimate ran: the network at low resolution, or another
        first = branch not in gen.templates  # nothing computed yet: no output to stand in for
        row_actions = ["C"] * batch
        device = hidden.device

        # 1. The step rule: which rows the network answers at all; the others it estimates.
        rule = self.rules.step
        state = gen.state_for(branch, "step", rule) if rule is not None else None
        step_run: torch.Tensor | None = None  # bool over the batch (host); None = every row
        est, est_rows = None, None
        if rule is not None:
            plan = self._agreed(_tie_cfg_pairs(rule.plan(ctx, state), ctx), device)
            compute_all, compute_none, mask = _resolve(
                True if first and not getattr(rule, "answers_first", False) else plan, batch
            )
            if not compute_all:
                est_rows = None if compute_none else _global_rows(None, ~mask, device)
                # Only an estimate may run the network another way (CallContext.run_at, run_model).
                ctx._run_at = lambda scale, rows: self._run_at(bound, batch, scale, rows, ran)
                ctx._run_model = lambda module, rows: self._run_model(
                    bound, batch, module, rows, ran, gen.templates.get(branch)
                )
                est = rule.estimate(ctx, state, est_rows)
                ctx._run_at = ctx._run_model = None
                # None: the rule's own validation rejected its estimate. The guard's finiteness
                # and range check is one host read.
                usable = est is not None and (
                    not self.rules.guard or self._usable(gen, (branch, "step"), (est,), est_rows)
                )
                if not self._all_ranks(usable, device):
                    gen.stats.fallbacks += 1
                    compute_all, est, est_rows = True, None, None
            if not compute_all:
                step_run = torch.zeros(batch, dtype=torch.bool) if compute_none else mask.cpu()
        skipped = "P" if ran else "E"  # a cheaper network ran: partial work, not none
        if step_run is not None and not bool(step_run.any()):
            gen.stats.record([skipped] * batch)
            gen.estimated_steps.append(step)
            return _replace_first(gen.templates.get(branch, ran[-1] if ran else None), est)

        # 2. The guidance rule: which unconditional rows of computed pairs to leave out.
        if mode == "separate":
            guide = self._separate_guidance_plan(gen, ctx, step_run) if branch % 2 else None
        else:
            guide = self._guidance_plan(gen, ctx, step_run)
        run = torch.ones(batch, dtype=torch.bool) if step_run is None else step_run.clone()
        if guide is not None:
            run[guide.uncond[guide.dropped]] = False

        # 3. Run the rows that run (all of them, none, or gather -> run -> scatter).
        if guide is not None and guide.cond_source is not None and not bool(run.any()):
            # every row is the guidance rule's or the step rule's: the network does not run
            out = gen.templates.get(branch, gen.templates.get(0))
            full, part = torch.empty_like(guide.cond_source), None
        elif bool(run.all()):
            out = self._run(gen, ctx, bound, None, row_actions)
            full = part = _output_tensor(out, self.model)
        else:
            run_rows = _global_rows(None, run, device)
            out = self._run(gen, ctx, adapter.slice_rows(bound, run_rows, batch), run_rows, row_actions)
            part = _output_tensor(out, self.model)
            full = torch.empty((batch, *part.shape[1:]), dtype=part.dtype, device=part.device)
            full.index_copy_(0, run_rows, part)
        if self.rules.guard and part is not None:  # on the device, no sync: read at the end
            gen.finite.append((step, torch.isfinite(part).all()))
        if est_rows is not None:
            full.index_copy_(0, est_rows, est.to(full.dtype))
            for r in est_rows.tolist():
                row_actions[r] = skipped
        if guide is not None:
            self._guidance_finish(gen, ctx, bound, guide, full, row_actions)

        if rule is not None:
            rows = None if step_run is None else _global_rows(None, step_run, device)
            seen = full if rows is None else full.index_select(0, rows)
            rule.observe(ctx, state, seen, rows)
            if self.rules.guard:
                key = (branch, "step")
                gen.peaks[key] = _raise_peaks(gen.peaks.get(key), (seen,), rows, batch)
        gen.stats.record(row_actions)
        if any(a != "C" for a in row_actions):
            gen.estimated_steps.append(step)
        if mode == "separate" and branch % 2 == 0:  # the conditional pass the next call pairs with
            answered = torch.tensor([a != "E" for a in row_actions])
            gen.cond_out = (step, branch, full.detach(), answered)
        return out if full is _first(out) else _replace_first(out, full)

    def _run_at(
        self,
        bound: inspect.BoundArguments,
        batch: int,
        scale: float,
        rows: torch.Tensor | None,
        ran: list[bool],
    ) -> torch.Tensor:
        """``CallContext.run_at``: the plain network (block rules pass through) on a resized sample."""
        name = type(self.model).__name__
        hidden = bound.arguments[self.adapter.hidden_arg]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (4, 5):
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise UnsupportedModelError(
                f"{name}: its sample is {shape}, not (batch, channels, [frames,] height, width), so it "
                "cannot be run at another resolution here (packed tokens carry positions the pipeline builds)"
            )
        multiple = spatial_multiple(self.model)
        h, w = hidden.shape[-2:]
        size = (int(h * scale) // multiple * multiple, int(w * scale) // multiple * multiple)
        if min(size) < multiple:
            raise UnsupportedModelError(
                f"{name}: a {h}x{w} sample at scale {scale} rounds to {size[0]}x{size[1]} (a multiple of "
                f"its {multiple}-pixel patches); choose a larger scale"
            )
        new = bound if rows is None else self.adapter.slice_rows(bound, rows, batch)
        new = inspect.BoundArguments(new.signature, new.arguments.copy())
        new.arguments[self.adapter.hidden_arg] = resize(new.arguments[self.adapter.hidden_arg], size)
        try:
            out = self._orig_forward(*new.args, **new.kwargs)
        except Exception as e:
            raise UnsupportedModelError(
                f"{name}: refused a {size[0]}x{size[1]} sample ({type(e).__name__}: {e}); running at a "
                "lower resolution needs a model that accepts other sizes"
            ) from e
        ran.append(None)  # its output has another size: no template for this call's answer
        return _output_tensor(out, self.model)

    def _run_model(
        self,
        bound: inspect.BoundArguments,
        batch: int,
        module: Any,
        rows: torch.Tensor | None,
        ran: list[Any],
        template: Any,
    ) -> torch.Tensor:
        """``CallContext.run_model``: ``module`` called with this call's arguments (``rows`` only)."""
        new = bound if rows is None else self.adapter.slice_rows(bound, rows, batch)
        hidden = as_batch(new.arguments[self.adapter.hidden_arg])
        mine, theirs = next(self.model.parameters(), None), next(module.parameters(), None)
        if (
            mine is not None
            and theirs is not None
            and (theirs.device, theirs.dtype) != (mine.device, mine.dtype)
        ):
            module.to(mine.device, mine.dtype)
        try:
            out = module(*new.args, **new.kwargs)
        except Exception as e:
            raise UnsupportedModelError(
                f"{type(module).__name__} (the stand-in model) refused {type(self.model).__name__}'s "
                f"arguments ({type(e).__name__}: {e}); it must take the same inputs"
            ) from e
        tensor = _output_tensor(out, module)
        # Before the model's own first output, the answer must have the sample's shape (a noise or
        # velocity prediction; a stand-in for a model that also predicts variances is refused there).
        want = hidden if template is None else _output_tensor(template, self.model)
        if hidden is None or tensor.shape[0] != len(hidden) or tensor.shape[1:] != want.shape[1:]:
            raise UnsupportedModelError(
                f"{type(module).__name__} answered {tuple(tensor.shape[1:])} per sample where "
                f"{type(self.model).__name__} answers {tuple(want.shape[1:]) if want is not None else None}; "
                "a stand-in model must give the same output shape"
            )
        ran.append(out if rows is None else None)  # a whole-batch answer can serve as the template
        return tensor

    def _usable(self, gen: Generation, key: tuple, est: Streams, rows: torch.Tensor | None) -> bool:
        """Whether every row of an estimate passes the guard: one host sync however many streams."""
        n = next((s.shape[0] for s in est if s is not None), 0)
        return bool(_rows_usable(est, gen.peaks.get(key), rows, n).all())

    def _observe_block(
        self, gen: Generation, scratch: CallScratch, ctx: CallContext, residual: Streams, rows: Any
    ) -> None:
        self.rules.block.observe(ctx, scratch.state, residual, rows)
        if self.rules.guard:
            key = _block_key(scratch)
            gen.peaks[key] = _raise_peaks(gen.peaks.get(key), residual, rows, ctx.batch)

    def _methods(self) -> str:
        """The policy's methods, as a warning names them."""
        rules = getattr(self.policy, "rules", None)
        if rules:
            return ", ".join(rule.method for rule in rules.values())
        found = (self.rules.step, self.rules.block, self.rules.guidance)
        return ", ".join(type(r).__name__ for r in found if r is not None) or "stepcache"

    # ---- guidance ---------------------------------------------------------------------------
    def _guidance_plan(self, gen: Generation, ctx: CallContext, step_run: torch.Tensor | None) -> Any:
        """Which pairs of this call drop their unconditional row, or None when no rule applies.

        Only pairs whose two rows both run are candidates (the others are the step rule's). One
        host sync: the unconditional mask (and a tensor plan) are read on the host.
        """
        grule = self.rules.guidance
        if grule is None:
            return None
        mask = ctx.uncond_rows()
        if mask is None:
            return None  # no batched CFG in this call
        mask = mask.reshape(-1).cpu()
        uncond = torch.nonzero(mask).reshape(-1)
        cond = torch.nonzero(~mask).reshape(-1)
        if uncond.numel() == 0 or uncond.numel() != cond.numel():
            return None
        state = gen.state_for(ctx.branch, "guidance", grule)
        pairs = uncond.numel()
        both = torch.ones(pairs, dtype=torch.bool)
        if step_run is not None:
            both = step_run[uncond] & step_run[cond]
        keep_all, keep_none, keep = _resolve(self._agreed(grule.plan(ctx, state)), pairs)
        if keep_all:
            dropped = torch.zeros(pairs, dtype=torch.bool)
        else:
            dropped = both.clone() if keep_none else both & ~keep.cpu()
        return _GuidanceCall(state, uncond, cond, both, dropped)

    def _separate_guidance_plan(
        self, gen: Generation, ctx: CallContext, step_run: torch.Tensor | None
    ) -> _GuidanceCall | None:
        """The unconditional call (odd branch) of a step whose conditional call (the branch
        before it) came first: its rows pair with that call's rows, one to one; only pairs whose
        two rows the network answers are candidates. The rule sees pairs as on batched CFG
        (``ctx.batch`` is both calls' rows). A second-order scheduler's second evaluation is
        another such pair of calls (branches 2 and 3)."""
        grule = self.rules.guidance
        if grule is None or gen.cond_out is None or gen.cond_out[:2] != (ctx.step, ctx.branch - 1):
            return None
        _, pair_branch, cond, answered = gen.cond_out
        if cond.shape[0] != ctx.batch:
            return None  # the two calls are not one pair per row
        pair_ctx = CallContext(**{**ctx.__dict__, "batch": 2 * ctx.batch, "branch": pair_branch})
        state = gen.state_for(pair_branch, "guidance", grule)
        both = answered.clone() if step_run is None else answered & step_run
        keep_all, keep_none, keep = _resolve(self._agreed(grule.plan(pair_ctx, state)), ctx.batch)
        if keep_all:
            dropped = torch.zeros(ctx.batch, dtype=torch.bool)
        else:
            dropped = both.clone() if keep_none else both & ~keep.cpu()
        rows = torch.arange(ctx.batch)
        return _GuidanceCall(state, rows, rows, both, dropped, cond_source=cond, ctx=pair_ctx)

    def _guidance_finish(
        self,
        gen: Generation,
        ctx: CallContext,
        bound: inspect.BoundArguments,
        guide: _GuidanceCall,
        full: torch.Tensor,
        row_actions: list[str],
    ) -> None:
        """Fill the left-out unconditional rows from the rule's estimate; let it observe the rest."""
        grule = self.rules.guidance
        device = full.device
        source = full if guide.cond_source is None else guide.cond_source
        pair_ctx = guide.ctx or ctx
        pair_idx = torch.arange(guide.uncond.numel())
        if bool(guide.dropped.any()):
            pairs = pair_idx[guide.dropped].to(device)
            u_rows = guide.uncond[guide.dropped].to(device)
            cond = source.index_select(0, guide.cond[guide.dropped].to(device))
            est = grule.estimate(pair_ctx, guide.state, cond, pairs)
            usable = est is not None and (not self.rules.guard or _finite((est,)))
            if not self._all_ranks(usable, device):
                gen.stats.fallbacks += 1
                sub = self._run(
                    gen, ctx, self.adapter.slice_rows(bound, u_rows, ctx.batch), u_rows, row_actions
                )
                full.index_copy_(0, u_rows, _first(sub))
                guide.dropped[:] = False
            else:
                full.index_copy_(0, u_rows, est.to(full.dtype))
                for r in u_rows.tolist():
                    row_actions[r] = "G"
                gen.stats.cfg_skipped += len(u_rows)
        observed = guide.both & ~guide.dropped
        if bool(observed.any()):
            grule.observe(
                pair_ctx,
                guide.state,
                source.index_select(0, guide.cond[observed].to(device)),
                full.index_select(0, guide.uncond[observed].to(device)),
                pair_idx[observed].to(device),
            )

    def _run(
        self,
        gen: Generation,
        ctx: CallContext,
        bound: inspect.BoundArguments,
        rows: torch.Tensor | None,
        row_actions: list[str],
    ) -> Any:
        """Run the real denoiser on ``bound`` (the block hooks see this call's scratch)."""
        block = self.rules.block
        scratch = None
        if isinstance(block, BranchRule):
            scratch = self._branch_scratch(gen, ctx, rows, row_actions)
        elif block is not None and self._blocks:
            scratch = CallScratch(
                ctx=ctx,
                state=gen.state_for(ctx.branch, "block", block),
                span=None if isinstance(block, PerBlockRule) else block.span_at(len(self._blocks), ctx),
                rows=rows,
                row_actions=row_actions,
                per_block=isinstance(block, PerBlockRule),
            )
        gen.call = scratch
        try:
            out = self._orig_forward(*bound.args, **bound.kwargs)
        finally:
            gen.call = None
        if (
            scratch is not None
            and not isinstance(block, BranchRule)
            and scratch.next_block != len(self._blocks)
        ):
            raise self._stack_changed(f"called {scratch.next_block} of its {len(self._blocks)} blocks")
        if rows is None or ctx.branch not in gen.templates:
            gen.templates[ctx.branch] = out
        return out

    # ---- decisions across ranks ------------------------------------------------------------
    def _agreed(self, plan: Any, device: torch.device | None = None) -> Any:
        """The plan every rank of a split model takes (``ranks.Agreement``); as is otherwise."""
        return plan if self.agreement is None else self.agreement.plan(plan, device)

    def _all_ranks(self, ok: bool, device: torch.device | None = None) -> bool:
        return ok if self.agreement is None else self.agreement.every(ok, device)

    # ---- module caches (DeepCache, FORA) ---------------------------------------------------
    def _branch_scratch(
        self, gen: Generation, ctx: CallContext, rows: torch.Tensor | None, row_actions: list[str]
    ) -> CallScratch:
        state = gen.state_for(ctx.branch, "block", self.rules.block)
        plan = self._agreed(self.rules.block.plan(ctx, state))
        # A sub-batch cannot use the full batch's cached outputs: it computes.
        modules = gen.module_cache(ctx.branch)
        skipping = not plan and rows is None and modules.ready
        if skipping:
            for r in range(len(row_actions)):
                row_actions[r] = "P"
        return CallScratch(
            ctx=ctx,
            state=state,
            span=None,
            rows=rows,
            row_actions=row_actions,
            skipping=skipping,
            modules=modules,
        )

    def _branch_forward(self, index: int, *args: Any, **kwargs: Any) -> Any:
        gen = self._current()
        scratch = gen.call if gen is not None else None
        if scratch is None:
            return self._block_orig[index](*args, **kwargs)
        replayed = index in self._replayed
        # A module may run more than once per forward (CogView4's feed-forward, on the image and
        # on the text tokens): each of its calls keeps its own output.
        key = (index, scratch.module_calls.get(index, 0))
        scratch.module_calls[index] = key[1] + 1
        cache = scratch.modules
        assert cache is not None  # set by _branch_scratch for every call of a module-output rule
        known = key in cache.outputs if replayed else key in cache.shapes
        if not scratch.skipping or not known:
            out = self._block_orig[index](*args, **kwargs)
            if scratch.rows is None and not scratch.skipping:
                # Replayed modules keep their output; the others only its shapes, so their
                # placeholders cost no memory between steps.
                if replayed:
                    cache.outputs[key] = _detached(out)
                else:
                    cache.shapes[key] = _shapes(out)
                cache.ready = True
            return out
        if replayed:
            return cache.outputs[key]
        return _placeholders(cache.shapes[key])

    # ---- block calls ----------------------------------------------------------------------
    def _stack_changed(self, what: str) -> UnsupportedModelError:
        """A span of the stack can be skipped only if every call runs all its blocks in order."""
        return UnsupportedModelError(
            f"{type(self.model).__name__}: its block stack changed between calls ({what} in this "
            "call), so block-level rules cannot skip a span of it; stepcache was disabled on it"
        )

    def _block_forward(self, index: int, *args: Any, **kwargs: Any) -> Any:
        gen = self._current()
        scratch = gen.call if gen is not None else None
        if scratch is None:
            return self._block_orig[index](*args, **kwargs)
        if index != scratch.next_block:
            raise self._stack_changed(f"called block {index} where block {scratch.next_block} comes next")
        scratch.next_block = index + 1
        if scratch.per_block:
            return self._per_block(gen, scratch, index, args, kwargs)
        head_end, tail_start = scratch.span
        if index < head_end:
            if index == 0:
                scratch.head_in = self.adapter.block_io.read_in(self._block_sig[0].bind(*args, **kwargs))
            return self._block_orig[index](*args, **kwargs)
        if index >= tail_start:
            return self._block_orig[index](*args, **kwargs)
        if index == head_end:
            return self._middle_start(gen, scratch, args, kwargs)
        io = self.adapter.block_io
        if scratch.skipping:
            return io.format_out(io.read_in(self._block_sig[index].bind(*args, **kwargs)))
        out = self._block_orig[index](*args, **kwargs)
        if index == tail_start - 1:
            residual = _sub(io.read_out(out), scratch.mid_in)
            self._observe_block(gen, scratch, scratch.ctx, residual, scratch.rows)
        return out

    def _per_block(self, gen: Generation, scratch: CallScratch, index: int, args: tuple, kwargs: dict) -> Any:
        """One block under a PerBlockRule: its input plus the estimated residual, or the block."""
        rule, io, ctx = self.rules.block, self.adapter.block_io, scratch.ctx
        if scratch.rows is not None:  # a subset of the rows: the caches hold the full batch
            return self._block_orig[index](*args, **kwargs)
        s_in = io.read_in(self._block_sig[index].bind(*args, **kwargs))
        key = (ctx.branch, "block", index)
        if not self._agreed(rule.plan(ctx, scratch.state, index, s_in), s_in[0].device):
            est = rule.estimate(ctx, scratch.state, index, s_in)
            if self._all_ranks(not self.rules.guard or self._usable(gen, key, est, None), s_in[0].device):
                scratch.row_actions[:] = ["P"] * len(scratch.row_actions)
                return io.format_out(_add(s_in, est))
            gen.stats.fallbacks += 1
        out = self._block_orig[index](*args, **kwargs)
        residual = _sub(io.read_out(out), s_in)
        rule.observe(ctx, scratch.state, index, s_in, residual)
        if self.rules.guard:
            gen.peaks[key] = _raise_peaks(gen.peaks.get(key), residual, None, ctx.batch)
        return out

    def _middle_start(self, gen: Generation, scratch: CallScratch, args: tuple, kwargs: dict) -> Any:
        rule = self.rules.block
        io = self.adapter.block_io
        head_end, tail_start = scratch.span
        bound = self._block_sig[head_end].bind(*args, **kwargs)
        if isinstance(rule, TokenRule):
            return self._token_middle(gen, scratch, bound)
        s_in = io.read_in(bound)
        ctx = CallContext(**{**scratch.ctx.__dict__, "rows": scratch.rows})
        state = scratch.state
        if head_end == 0:
            # No head: the rule decides on the first block's timestep-modulated input (or its
            # plain input where the family has none).
            signal = self.adapter.modulated_input(self._blocks[0], bound) if rule.wants_signal else None
            plan = rule.plan(ctx, state, (s_in[0] if signal is None else signal,))
        elif scratch.head_in is not None:
            plan = rule.plan(ctx, state, _sub(s_in, scratch.head_in))
        else:
            plan = True
        plan = _tie_cfg_pairs(plan, ctx)
        active = int(s_in[0].shape[0])
        est_all = None
        if self.rules.guard and isinstance(plan, torch.Tensor):
            # A per-row plan is read on the host anyway: fold the guard into that one read.
            # Rows whose estimate is not finite or out of range join the rows that compute
            # (counted at the end).
            est_all = rule.estimate(ctx, state, scratch.rows)
            wanted = plan.to(device=s_in[0].device, dtype=torch.bool).reshape(-1)
            peaks = gen.peaks.get(_block_key(scratch))
            unusable = ~_rows_usable(est_all, peaks, scratch.rows, active).to(wanted.device)
            gen.deferred_fallbacks.append((unusable & ~wanted).sum())
            plan = wanted | unusable
        compute_all, compute_none, mask = _resolve(self._agreed(plan, s_in[0].device), active)

        if not compute_all and est_all is not None:
            if compute_none:
                est = est_all
            else:  # nonzero reads the mask's size: only where some rows run
                est = take_streams(est_all, torch.nonzero(~mask).reshape(-1).to(s_in[0].device))
        elif not compute_all:
            skip_rows = scratch.rows if compute_none else _global_rows(scratch.rows, ~mask, s_in[0].device)
            est = rule.estimate(ctx, state, skip_rows)
            usable = not self.rules.guard or self._usable(gen, _block_key(scratch), est, skip_rows)
            if not self._all_ranks(usable, s_in[0].device):
                gen.stats.fallbacks += 1
                compute_all = True
        if compute_all:
            scratch.mid_in = s_in
            out = self._block_orig[head_end](*args, **kwargs)
            if head_end == tail_start - 1:
                self._observe_block(gen, scratch, ctx, _sub(io.read_out(out), s_in), scratch.rows)
            return out

        scratch.skipping = True
        skipped_local = range(active) if compute_none else torch.nonzero(~mask).reshape(-1).tolist()
        to_global = list(range(active)) if scratch.rows is None else scratch.rows.tolist()
        for r in skipped_local:
            scratch.row_actions[to_global[r]] = "P"
        if compute_none:
            return io.format_out(_add(s_in, est))

        # Some rows run the middle: gather them, run the span here, scatter back.
        run_local = torch.nonzero(mask).reshape(-1).to(s_in[0].device)
        skip_local = torch.nonzero(~mask).reshape(-1).to(s_in[0].device)
        sub = self.adapter.slice_rows(bound, run_local, active)
        sub_in = io.read_in(sub)
        streams = self._run_span(sub, sub_in, head_end, tail_start)
        residual = _sub(streams, sub_in)
        run_global = _global_rows(scratch.rows, mask, s_in[0].device)
        self._observe_block(gen, scratch, ctx, residual, run_global)
        skipped = _add(take_streams(s_in, skip_local), est)
        full = _scatter(s_in, run_local, streams)
        full = _scatter(full, skip_local, skipped)
        return io.format_out(full)

    def _run_span(self, bound: inspect.BoundArguments, streams: Streams, start: int, end: int) -> Streams:
        """Blocks ``start:end`` run here in turn on ``streams``, with ``bound``'s other arguments."""
        io = self.adapter.block_io
        for j in range(start, end):
            call = inspect.BoundArguments(self._block_sig[j], bound.arguments.copy())
            for name, value in zip(io.streams, streams, strict=True):
                if name in call.arguments or value is not None:
                    call.arguments[name] = value
            streams = io.read_out(self._block_orig[j](*call.args, **call.kwargs))
        return streams

    def _token_middle(self, gen: Generation, scratch: CallScratch, bound: inspect.BoundArguments) -> Any:
        """The middle span under a TokenRule: on every token, or on the tokens the rule picks
        (per row) with self-attention reading the other tokens' cached keys and values."""
        rule, io = self.rules.block, self.adapter.block_io
        head_end, tail_start = scratch.span
        s_in = io.read_in(bound)
        hidden = s_in[0]
        if hidden is None or hidden.dim() != 3:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: token caching needs its blocks' hidden states as "
                f"(batch, tokens, channels), and they are {None if hidden is None else tuple(hidden.shape)}"
            )
        layout = [n for n, v in bound.arguments.items() if v is not None and _TOKEN_LAYOUT.search(n)]
        if layout:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: its blocks take {', '.join(layout)}: per-token positions "
                "(rotary) or a spatial layout used inside the block, which a subset of the tokens "
                "cannot keep; token caching needs positions added before the blocks"
            )
        ctx = CallContext(**{**scratch.ctx.__dict__, "rows": scratch.rows})
        tokens = rule.plan(ctx, scratch.state, s_in)
        span = _TokenSpan(gen.token_cache(ctx.branch), scratch.rows, tokens, ctx.batch, hidden.shape[1])
        scratch.skipping = True  # the span runs here: its other blocks pass their input on
        if tokens is None:
            out = self._run_token_span(scratch, span, bound, s_in, head_end, tail_start)
            rule.observe(ctx, scratch.state, s_in, _sub(out, s_in), None, scratch.rows)
            return io.format_out(out)
        for r in range(hidden.shape[0]) if scratch.rows is None else scratch.rows.tolist():
            scratch.row_actions[r] = "P"
        est = rule.estimate(ctx, scratch.state, scratch.rows)
        if tokens.shape[1] == 0:  # no token runs: every stream reuses its residual
            return io.format_out(_add(s_in, est))
        sub = (gather_tokens(hidden, tokens), *s_in[1:])
        out = self._run_token_span(scratch, span, bound, sub, head_end, tail_start)
        rule.observe(ctx, scratch.state, s_in, _sub(out, sub), tokens, scratch.rows)
        return io.format_out((scatter_tokens_(hidden + est[0], tokens, out[0]), *out[1:]))

    def _run_token_span(
        self,
        scratch: CallScratch,
        span: _TokenSpan,
        bound: inspect.BoundArguments,
        streams: Streams,
        start: int,
        end: int,
    ) -> Streams:
        scratch.token_span = span  # the key and value projections read it (_bind_projection)
        try:
            out = self._run_span(bound, streams, start, end)
        finally:
            scratch.token_span = None
        # Every layer must have projected through the wrapped to_k and to_v (fusing them later,
        # e.g. fuse_qkv_projections(), would leave the running queries with their own keys only).
        missing = [
            f"block {j}"
            for j in range(start, end)
            for a in range(len(self._attentions[j]))
            if not {(j, a, "to_k"), (j, a, "to_v")} <= span.fired
        ]
        if missing:
            raise UnsupportedModelError(
                f"token caching: the self-attention of {', '.join(dict.fromkeys(missing))} did "
                "not call its to_k and to_v (fused projections?), so its keys cannot be kept per token"
            )
        return out


# Block arguments that tie computation to every token's place: positions applied inside
# attention (rotary embeddings), or the grid a block reshapes its tokens into (Sana's Mix-FFN).
_TOKEN_LAYOUT = re.compile(r"rotary|rope|freqs|pos_emb|position|height|width|frames")


def self_attentions(block: nn.Module) -> list[nn.Module]:
    """The attention layers of a block that may attend over its own tokens: those with key and
    value projections that do not declare themselves cross-attention. (A layer that turns out to
    project other tokens is refused when it runs: its width is not the span's.)"""
    found = [
        m
        for m in block.modules()
        if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("to_q", "to_k", "to_v"))
        and not getattr(m, "is_cross_attention", False)
    ]
    if not found:
        raise UnsupportedModelError(f"{type(block).__name__} has no self-attention layer for token caching")
    return found


@dataclass
class _TokenSpan:
    """What the key and value projections of a span running under a TokenRule need to know."""

    cache: dict[tuple[int, int, str], torch.Tensor]  # per (block, layer, projection): all tokens
    rows: torch.Tensor | None
    tokens: torch.Tensor | None  # (active rows, k) token positions running; None = all of them
    batch: int
    length: int  # tokens the blocks carry
    fired: set[tuple[int, int, str]] = field(default_factory=set)  # projections that ran


def _project(span: _TokenSpan, key: tuple[int, int, str], output: torch.Tensor) -> torch.Tensor:
    """A key or value projection's output inside the span: recorded for every token, or, run on
    some tokens, written into the kept full-length projection, which attention then gets whole."""
    span.fired.add(key)
    width, tokens = output.shape[1], span.tokens
    running = span.length if tokens is None else tokens.shape[1]
    stored = take(span.cache.get(key), span.rows)
    if width != running or (tokens is not None and (stored is None or stored.shape[1] != span.length)):
        raise UnsupportedModelError(
            f"token caching: self-attention {key[1]} of block {key[0]} projects {width} tokens "
            f"where the blocks carry {running} (other tokens, such as a text, are mixed into "
            "its keys), so its keys cannot be kept per token"
        )
    if tokens is None:
        span.cache[key] = put(span.cache.get(key), span.rows, output, span.batch)
        return output
    # In place: the kept projection is the runtime's own (a copy of the rows when rows is set),
    # and attention has read it before the next call writes it.
    scatter_tokens_(stored, tokens, output)
    if span.rows is not None:
        span.cache[key] = put(span.cache[key], span.rows, stored, span.batch)
    return stored


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` with its last two (spatial) dimensions resized: area averaging down, bilinear up."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    flat = x.reshape(x.shape[0], -1, *x.shape[-2:])
    mode = "area" if size[0] <= x.shape[-2] and size[1] <= x.shape[-1] else "bilinear"
    out = torch.nn.functional.interpolate(flat.float(), size=size, mode=mode)
    return out.to(x.dtype).reshape(*x.shape[:-2], *size)


def spatial_multiple(model: nn.Module) -> int:
    """The size a sample's height and width must be a multiple of: the patch size of a
    transformer, the total downsampling of a U-Net (from the model's config; 1 if it says neither)."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[-1]
    if isinstance(patch, int) and patch > 0:
        return patch
    channels = getattr(config, "block_out_channels", None)
    if isinstance(channels, (list, tuple)) and channels:
        return 2 ** (len(channels) - 1)
    return 1


def _block_key(scratch: CallScratch) -> tuple:
    # Per span: a rule whose span moves with the step (Delta-DiT) sees residuals of other sizes.
    return (scratch.ctx.branch, "block", scratch.span)


# ---- attach / detach ------------------------------------------------------------------------
def _set(handle: Handle, obj: Any, attr: str, value: Any) -> None:
    had_own = attr in obj.__dict__
    handle._installed.append((obj, attr, had_own, obj.__dict__.get(attr)))
    # Straight into the instance dict: bypasses nn.Module / pipeline __setattr__ bookkeeping.
    obj.__dict__[attr] = value


class _GenerationBar:
    """Wraps a pipeline's progress bar: its scope is one generation, each ``update`` one step."""

    def __init__(self, handle: Handle, bar: Any, gen: Generation):
        self._handle = handle
        self._bar = bar
        self._gen = gen

    def __enter__(self) -> _GenerationBar:
        self._handle._begin(self._gen)
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        self._handle._end(self._gen)
        return self._bar.__exit__(*exc)

    def update(self, n: int = 1) -> Any:
        self._gen.advance_step()
        return self._bar.update(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


def _iterate_generation(handle: Handle, bar: Any, gen: Generation) -> Iterator[Any]:
    handle._begin(gen)
    try:
        for i, item in enumerate(bar):
            gen.advance_step(i)
            yield item
    finally:
        handle._end(gen)


def attach(
    target: Any, model: nn.Module, adapter: Adapter, rules: RuleSet, policy: Any, group: Any = None
) -> Handle:
    """Install the runtime on ``model`` (and on ``target``'s progress bar if it is a pipeline);
    ``group``: whose ranks must agree on every decision (``ranks.agreement_for``)."""
    agreement = agreement_for(model, group)
    previous = _HANDLES.get(model)
    if previous is not None:
        detach(model)
    handle = Handle(target, model, adapter, rules, policy, agreement)
    if isinstance(rules.block, BranchRule):
        replayed, skipped = rules.block.modules(adapter, model)
        blocks = replayed + skipped
        handle._replayed = set(range(len(replayed)))
    else:
        blocks = adapter.blocks() if rules.block is not None else None
    if rules.block is not None and not isinstance(rules.block, BranchRule) and not blocks:
        raise UnsupportedModelError(
            f"block-level rule {type(rules.block).__name__} needs a linear block stack, and "
            f"{type(model).__name__} ({adapter.family}) has none"
        )
    if isinstance(rules.block, TokenRule):
        if agreement is not None:
            raise UnsupportedModelError(
                "token caching picks tokens per rank's shard, and ranks cannot agree on per-token "
                "choices: use a step- or block-level rule under context parallelism"
            )
        handle._attentions = [self_attentions(b) for b in blocks]
    _set(handle, model, "forward", handle._forward)
    wrap = _bind_branch if isinstance(rules.block, BranchRule) else _bind_block
    for i, blk in enumerate(blocks or []):
        handle._blocks.append(blk)
        handle._block_orig.append(blk.forward)
        handle._block_sig.append(inspect.signature(blk.forward))
        _set(handle, blk, "forward", wrap(handle, i))
    if isinstance(rules.block, TokenRule):
        for j, layers in enumerate(handle._attentions):
            for a, layer in enumerate(layers):
                for name in ("to_k", "to_v"):
                    proj = getattr(layer, name)
                    _set(handle, proj, "forward", _bind_projection(handle, (j, a, name), proj.forward))
    if target is not model and callable(getattr(target, "progress_bar", None)):
        orig_bar = target.progress_bar

        def progress_bar(iterable: Any = None, total: int | None = None) -> Any:
            bar = orig_bar(iterable=iterable, total=total)
            n = total if iterable is None else (len(iterable) if hasattr(iterable, "__len__") else None)
            caller = sys._getframe(1)
            while caller.f_code is progress_bar.__code__:  # another denoiser's wrapper (two experts)
                caller = caller.f_back
            gen = Generation(n, None, *handle._pipeline_cfg(caller.f_locals))
            gen.scheduler_order = int(getattr(getattr(target, "scheduler", None), "order", 1) or 1)
            if iterable is None:
                return _GenerationBar(handle, bar, gen)
            return _iterate_generation(handle, bar, gen)

        _set(handle, target, "progress_bar", progress_bar)
    for obj in _patched_objects(handle):
        _guard_copies(handle, obj)
    _HANDLES[model] = handle
    if previous is not None:
        previous._replaced = True
    return handle


# ---- copies and pickles of patched objects ----------------------------------------------------
# Both hooks are instance attributes (copy.deepcopy looks ``__deepcopy__`` up on the instance,
# and pickle and copy.copy ``__reduce_ex__``), installed and removed like the wrappers.
def _patched_objects(handle: Handle) -> list[Any]:
    seen: dict[int, Any] = {}
    for obj, _, _, _ in handle._installed:
        seen.setdefault(id(obj), obj)
    return list(seen.values())


def _guard_copies(handle: Handle, obj: Any) -> None:
    def deepcopy_plain(memo: dict[int, Any]) -> Any:
        return _plain_deepcopy(handle, obj, memo)

    def refuse_pickle(protocol: int = 2) -> Any:
        raise TypeError(_refusal(obj, "pickled or shallow-copied"))

    _set(handle, obj, "__deepcopy__", deepcopy_plain)
    _set(handle, obj, "__reduce_ex__", refuse_pickle)


def _refusal(obj: Any, what: str) -> str:
    return (
        f"this {type(obj).__name__} has stepcache enabled and cannot be {what}; "
        "call stepcache.disable(pipe) first (and enable it again afterwards)"
    )


def _own_state(handle: Handle, obj: Any) -> dict[str, tuple[bool, Any]]:
    """attr -> (had its own value, that value) for what stepcache installed on ``obj``; the first
    record wins (``compile`` wraps an installed wrapper again)."""
    own: dict[str, tuple[bool, Any]] = {}
    for o, attr, had_own, value in handle._installed:
        if o is obj:
            own.setdefault(attr, (had_own, value))
    return own


def _plain_deepcopy(handle: Handle, obj: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of ``obj`` as it was before stepcache: what copy.deepcopy would make of it
    through its class's ``__reduce_ex__``, minus the attributes stepcache installed (submodules
    that stepcache patched strip theirs the same way as the copy reaches them)."""
    rv = type(obj).__reduce_ex__(obj, 4)
    plain = (
        isinstance(rv, tuple)
        and len(rv) >= 3
        and rv[0] is copyreg.__newobj__
        and isinstance(rv[2], dict)
        and all(extra is None for extra in rv[3:])
    )
    if not plain:  # a class with its own reduction: stripping its state is not safe
        raise TypeError(_refusal(obj, "deep-copied"))
    cls, *args = rv[1]
    y = cls.__new__(cls, *copy.deepcopy(args, memo))
    memo[id(obj)] = y
    own = _own_state(handle, obj)
    state = {k: v for k, v in rv[2].items() if k not in own}
    state.update({k: value for k, (had_own, value) in own.items() if had_own})
    state = copy.deepcopy(state, memo)
    if hasattr(y, "__setstate__"):
        y.__setstate__(state)
    else:
        y.__dict__.update(state)
    return y


def _detached(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return (out.shape, out.dtype, out.device)
    return tuple(_shapes(o) for o in out)


def _placeholders(shapes: Any) -> Any:
    if isinstance(shapes[0], torch.Size):
        shape, dtype, device = shapes
        return torch.empty(shape, dtype=dtype, device=device)
    return tuple(_placeholders(s) for s in shapes)


def _bind_branch(handle: Handle, index: int) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return handle._branch_forward(index, *args, **kwargs)

    return forward


def _bind_projection(handle: Handle, key: tuple[int, int, str], orig: Any) -> Any:
    # Out of dynamo: whether a span is running is the runtime's Python state.
    @torch.compiler.disable
    def forward(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        gen = handle._current()
        span = gen.call.token_span if gen is not None and gen.call is not None else None
        return out if span is None else _project(span, key, out)

    return forward


def _bind_block(handle: Handle, index: int) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return handle._block_forward(index, *args, **kwargs)

    return forward


def detach(model: nn.Module) -> bool:
    handle = _HANDLES.pop(model, None)
    if handle is None:
        return False
    for obj, attr, had_own, own in reversed(handle._installed):
        if had_own:
            obj.__dict__[attr] = own
        else:
            obj.__dict__.pop(attr, None)
    handle._installed.clear()
    return True


class ExpertsHandle:
    """One ``enable`` over a pipeline with several denoisers (Wan 2.2's high- and low-noise
    experts): a handle per denoiser, each counting the pipeline's steps, no cache shared."""

    def __init__(self, handles: dict[str, Handle]):
        self.handles = handles

    def stats(self) -> dict[str, Any]:
        """Counts summed over the experts; ``actions`` in the order the experts ran (one after
        the other); each expert's own under ``experts``."""
        per = {name: h.stats() for name, h in self.handles.items()}
        used = [st for st in per.values() if st["steps"]]
        out: dict[str, Any] = {
            k: sum(st[k] for st in per.values())
            for k in next(iter(per.values()))
            if k not in ("actions", "row_actions")
        }
        out["actions"] = [a for st in used for a in st["actions"]]
        out["row_actions"] = [r for st in used for r in st["row_actions"]]
        out["experts"] = per
        return out

    def disable(self) -> None:
        for h in reversed(list(self.handles.values())):  # each restores what the later one wrapped
            h.disable()

    def compile(self, **options: Any) -> ExpertsHandle:
        for h in self.handles.values():
            h.compile(**options)
        return self

    @property
    def active(self) -> bool:
        return any(h.active for h in self.handles.values())

    @property
    def policy(self) -> Any:
        return next(iter(self.handles.values())).policy


def handle_of(model: nn.Module) -> Handle | None:
    return _HANDLES.get(model)
