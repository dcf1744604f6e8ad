"""The block level: how a block rule runs inside one denoiser call.

One driver per kind of block rule, chosen at enable from the rule's interface (``driver_for``):
a span of a linear stack skipped as a whole (:class:`SpanDriver`), each block on its own
(:class:`PerBlockDriver`), a span run on some tokens (:class:`TokenDriver`), or module outputs
replayed in a U-Net (:class:`ModuleDriver`). The handle asks its driver for the call's scratch
before the real forward and checks the call after it; in between, each block's wrapper hands its
call to the driver.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .interfaces import (
    BlockRule,
    BranchRule,
    CallContext,
    PerBlockRule,
    Streams,
    TokenRule,
    gather_tokens,
    put,
    scatter_tokens_,
    take,
    take_streams,
)
from .rows import _add, _global_rows, _raise_peaks, _resolve, _rows_usable, _scatter, _sub, _tie_cfg_pairs
from .state import CallScratch, Generation

if TYPE_CHECKING:
    from .engine import Handle


class BlockDriver:
    """The hooks of one block rule on one model: its blocks, their original forwards and
    signatures, the scratch of each call, and the check after it."""

    probes = True  # the adapter may probe the stack with one plain call (stream layout)

    def __init__(self, handle: Handle, blocks: list[nn.Module]):
        self.handle = handle
        self.rule = handle.rules.block
        self.blocks = blocks
        self.orig = [b.forward for b in blocks]
        self.sig = [inspect.signature(b.forward) for b in blocks]

    @classmethod
    def build(cls, handle: Handle) -> BlockDriver:
        """The driver on the modules this kind of rule hooks; refuses a model without them."""
        blocks = handle.adapter.blocks()
        if not blocks:
            raise UnsupportedModelError(
                f"block-level rule {type(handle.rules.block).__name__} needs a linear block stack, and "
                f"{type(handle.model).__name__} ({handle.adapter.family}) has none"
            )
        return cls(handle, blocks)

    def install(self) -> None:
        for i, block in enumerate(self.blocks):
            self.handle._set(block, "forward", self._bind(i))

    def _bind(self, index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.forward(index, args, kwargs)

        return forward

    def compile(self, **options: Any) -> None:
        """Each block's own forward compiled; the hooks between blocks stay eager."""
        self.orig = [torch.compile(f, **options) for f in self.orig]
        for block in self.blocks:
            self.handle._set(block, "forward", torch.compiler.disable(block.forward))

    def scratch(
        self, gen: Generation, ctx: CallContext, rows: torch.Tensor | None, actions: list[str]
    ) -> CallScratch:
        raise NotImplementedError

    def finish(self, scratch: CallScratch) -> None:
        """After the forward: every block ran, in order (a span is skipped on that promise)."""
        if scratch.next_block != len(self.blocks):
            raise self.stack_changed(f"called {scratch.next_block} of its {len(self.blocks)} blocks")

    def forward(self, index: int, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _scratch_of_call(self) -> tuple[Generation | None, CallScratch | None]:
        gen = self.handle._current()
        return gen, (gen.call if gen is not None else None)

    def _next(self, scratch: CallScratch, index: int) -> None:
        if index != scratch.next_block:
            raise self.stack_changed(f"called block {index} where block {scratch.next_block} comes next")
        scratch.next_block = index + 1

    def stack_changed(self, what: str) -> UnsupportedModelError:
        """A span of the stack can be skipped only if every call runs all its blocks in order."""
        return UnsupportedModelError(
            f"{type(self.handle.model).__name__}: its block stack changed between calls ({what} in this "
            "call), so block-level rules cannot skip a span of it; stepcache was disabled on it"
        )


class SpanDriver(BlockDriver):
    """A BlockRule: the head runs, the rule decides on the middle span (per row), the tail runs."""

    def scratch(
        self, gen: Generation, ctx: CallContext, rows: torch.Tensor | None, actions: list[str]
    ) -> CallScratch:
        return CallScratch(
            ctx=ctx,
            state=gen.state_for(ctx.branch, "block", self.rule),
            span=self.rule.span_at(len(self.blocks), ctx),
            rows=rows,
            row_actions=actions,
        )

    def forward(self, index: int, args: tuple, kwargs: dict) -> Any:
        gen, scratch = self._scratch_of_call()
        if scratch is None:
            return self.orig[index](*args, **kwargs)
        self._next(scratch, index)
        head_end, tail_start = scratch.span
        if index < head_end:
            if index == 0:
                scratch.head_in = self.handle.adapter.block_io.read_in(self.sig[0].bind(*args, **kwargs))
            return self.orig[index](*args, **kwargs)
        if index >= tail_start:
            return self.orig[index](*args, **kwargs)
        if index == head_end:
            return self.middle(gen, scratch, args, kwargs)
        io = self.handle.adapter.block_io
        if scratch.skipping:
            return io.format_out(io.read_in(self.sig[index].bind(*args, **kwargs)))
        out = self.orig[index](*args, **kwargs)
        if index == tail_start - 1:
            self.observe(gen, scratch, scratch.ctx, _sub(io.read_out(out), scratch.mid_in), scratch.rows)
        return out

    def middle(self, gen: Generation, scratch: CallScratch, args: tuple, kwargs: dict) -> Any:
        """The first block of the middle span: the rule's decision, then the span in full, not
        at all (input plus the cached residual), or on the rows that run (gathered here)."""
        handle, rule, io = self.handle, self.rule, self.handle.adapter.block_io
        head_end, tail_start = scratch.span
        bound = self.sig[head_end].bind(*args, **kwargs)
        s_in = io.read_in(bound)
        ctx = CallContext(**{**scratch.ctx.__dict__, "rows": scratch.rows})
        state = scratch.state
        if head_end == 0:
            # No head: the rule decides on the first block's timestep-modulated input (or its
            # plain input where the family has none).
            signal = handle.adapter.modulated_input(self.blocks[0], bound) if rule.wants_signal else None
            plan = rule.plan(ctx, state, (s_in[0] if signal is None else signal,))
        elif scratch.head_in is not None:
            plan = rule.plan(ctx, state, _sub(s_in, scratch.head_in))
        else:
            plan = True
        plan = _tie_cfg_pairs(plan, ctx)
        active = int(s_in[0].shape[0])
        device = s_in[0].device
        est_all = None
        if handle.rules.guard and isinstance(plan, torch.Tensor):
            # A per-row plan is read on the host anyway: fold the guard into that one read.
            # Rows whose estimate is not finite or out of range join the rows that compute
            # (counted at the end).
            est_all = rule.estimate(ctx, state, scratch.rows)
            wanted = plan.to(device=device, dtype=torch.bool).reshape(-1)
            peaks = gen.peaks.get(_block_key(scratch))
            unusable = ~_rows_usable(est_all, peaks, scratch.rows, active).to(wanted.device)
            gen.deferred_fallbacks.append((unusable & ~wanted).sum())
            plan = wanted | unusable
        compute_all, compute_none, mask = _resolve(handle._agreed(plan, device), active)
        # nonzero reads the mask's size (a host sync): once, and only where some rows run
        partial = not (compute_all or compute_none)
        skip_local = torch.nonzero(~mask).reshape(-1).to(device) if partial else None

        if not compute_all and est_all is not None:
            est = est_all if compute_none else take_streams(est_all, skip_local)
        elif not compute_all:
            skip_rows = scratch.rows if compute_none else _global_rows(scratch.rows, ~mask, device)
            est = rule.estimate(ctx, state, skip_rows)
            usable = not handle.rules.guard or handle._usable(gen, _block_key(scratch), est, skip_rows)
            if not handle._all_ranks(usable, device):
                gen.stats.fallbacks += 1
                compute_all = True
        if compute_all:
            scratch.mid_in = s_in
            out = self.orig[head_end](*args, **kwargs)
            if head_end == tail_start - 1:
                self.observe(gen, scratch, ctx, _sub(io.read_out(out), s_in), scratch.rows)
            return out

        scratch.skipping = True
        skipped_local = range(active) if compute_none else skip_local.tolist()
        to_global = list(range(active)) if scratch.rows is None else scratch.rows.tolist()
        for r in skipped_local:
            scratch.row_actions[to_global[r]] = "P"
        if compute_none:
            return io.format_out(_add(s_in, est))

        # Some rows run the middle: gather them, run the span here, scatter back.
        run_local = torch.nonzero(mask).reshape(-1).to(device)
        sub = handle.adapter.slice_rows(bound, run_local, active)
        sub_in = io.read_in(sub)
        streams = self.run_span(sub, sub_in, head_end, tail_start)
        self.observe(gen, scratch, ctx, _sub(streams, sub_in), _global_rows(scratch.rows, mask, device))
        skipped = _add(take_streams(s_in, skip_local), est)
        full = _scatter(s_in, run_local, streams)
        return io.format_out(_scatter(full, skip_local, skipped))

    def observe(
        self, gen: Generation, scratch: CallScratch, ctx: CallContext, residual: Streams, rows: Any
    ) -> None:
        """The rule records the span's real residual (the guard its per-row norms)."""
        self.rule.observe(ctx, scratch.state, residual, rows)
        if self.handle.rules.guard:
            key = _block_key(scratch)
            gen.peaks[key] = _raise_peaks(gen.peaks.get(key), residual, rows, ctx.batch)

    def run_span(self, bound: inspect.BoundArguments, streams: Streams, start: int, end: int) -> Streams:
        """Blocks ``start:end`` run here in turn on ``streams``, with ``bound``'s other arguments."""
        io = self.handle.adapter.block_io
        for j in range(start, end):
            call = inspect.BoundArguments(self.sig[j], bound.arguments.copy())
            for name, value in zip(io.streams, streams, strict=True):
                if name in call.arguments or value is not None:
                    call.arguments[name] = value
            streams = io.read_out(self.orig[j](*call.args, **call.kwargs))
        return streams


class PerBlockDriver(BlockDriver):
    """A PerBlockRule: each block is its input plus the estimated residual, or the block."""

    def scratch(
        self, gen: Generation, ctx: CallContext, rows: torch.Tensor | None, actions: list[str]
    ) -> CallScratch:
        state = gen.state_for(ctx.branch, "block", self.rule)
        return CallScratch(ctx=ctx, state=state, span=None, rows=rows, row_actions=actions)

    def forward(self, index: int, args: tuple, kwargs: dict) -> Any:
        gen, scratch = self._scratch_of_call()
        if scratch is None:
            return self.orig[index](*args, **kwargs)
        self._next(scratch, index)
        handle, rule, io, ctx = self.handle, self.rule, self.handle.adapter.block_io, scratch.ctx
        if scratch.rows is not None:  # a subset of the rows: the caches hold the full batch
            return self.orig[index](*args, **kwargs)
        s_in = io.read_in(self.sig[index].bind(*args, **kwargs))
        key = (ctx.branch, "block", index)
        device = s_in[0].device
        if not handle._agreed(rule.plan(ctx, scratch.state, index, s_in), device):
            est = rule.estimate(ctx, scratch.state, index, s_in)
            if handle._all_ranks(not handle.rules.guard or handle._usable(gen, key, est, None), device):
                scratch.row_actions[:] = ["P"] * len(scratch.row_actions)
                return io.format_out(_add(s_in, est))
            gen.stats.fallbacks += 1
        out = self.orig[index](*args, **kwargs)
        residual = _sub(io.read_out(out), s_in)
        rule.observe(ctx, scratch.state, index, s_in, residual)
        if handle.rules.guard:
            gen.peaks[key] = _raise_peaks(gen.peaks.get(key), residual, None, ctx.batch)
        return out


# Block arguments that tie computation to every token's place: positions applied inside
# attention (rotary embeddings), or the grid a block reshapes its tokens into (Sana's Mix-FFN).
_TOKEN_LAYOUT = re.compile(r"rotary|rope|freqs|pos_emb|position|height|width|frames")


class TokenDriver(SpanDriver):
    """A TokenRule: the middle span runs on the tokens the rule picks (per row), and each
    self-attention's key and value projections keep every token's, so attention sees them all."""

    def __init__(self, handle: Handle, blocks: list[nn.Module]):
        if handle.agreement is not None:
            raise UnsupportedModelError(
                "token caching picks tokens per rank's shard, and ranks cannot agree on per-token "
                "choices: use a step- or block-level rule under context parallelism"
            )
        super().__init__(handle, blocks)
        self.attentions = [self_attentions(b) for b in blocks]

    def install(self) -> None:
        super().install()
        for j, layers in enumerate(self.attentions):
            for a, layer in enumerate(layers):
                for name in ("to_k", "to_v"):
                    proj = getattr(layer, name)
                    self.handle._set(
                        proj, "forward", _bind_projection(self.handle, (j, a, name), proj.forward)
                    )

    def middle(self, gen: Generation, scratch: CallScratch, args: tuple, kwargs: dict) -> Any:
        rule, io = self.rule, self.handle.adapter.block_io
        head_end, tail_start = scratch.span
        bound = self.sig[head_end].bind(*args, **kwargs)
        s_in = io.read_in(bound)
        hidden = s_in[0]
        name = type(self.handle.model).__name__
        if hidden is None or hidden.dim() != 3:
            raise UnsupportedModelError(
                f"{name}: token caching needs its blocks' hidden states as (batch, tokens, channels), "
                f"and they are {None if hidden is None else tuple(hidden.shape)}"
            )
        layout = [n for n, v in bound.arguments.items() if v is not None and _TOKEN_LAYOUT.search(n)]
        if layout:
            raise UnsupportedModelError(
                f"{name}: its blocks take {', '.join(layout)}: per-token positions "
                "(rotary) or a spatial layout used inside the block, which a subset of the tokens "
                "cannot keep; token caching needs positions added before the blocks"
            )
        ctx = CallContext(**{**scratch.ctx.__dict__, "rows": scratch.rows})
        tokens = rule.plan(ctx, scratch.state, s_in)
        span = _TokenSpan(gen.token_cache(ctx.branch), scratch.rows, tokens, ctx.batch, hidden.shape[1])
        scratch.skipping = True  # the span runs here: its other blocks pass their input on
        if tokens is None:
            out = self.run_token_span(scratch, span, bound, s_in, head_end, tail_start)
            rule.observe(ctx, scratch.state, s_in, _sub(out, s_in), None, scratch.rows)
            return io.format_out(out)
        for r in range(hidden.shape[0]) if scratch.rows is None else scratch.rows.tolist():
            scratch.row_actions[r] = "P"
        est = rule.estimate(ctx, scratch.state, scratch.rows)
        if tokens.shape[1] == 0:  # no token runs: every stream reuses its residual
            return io.format_out(_add(s_in, est))
        sub = (gather_tokens(hidden, tokens), *s_in[1:])
        out = self.run_token_span(scratch, span, bound, sub, head_end, tail_start)
        rule.observe(ctx, scratch.state, s_in, _sub(out, sub), tokens, scratch.rows)
        return io.format_out((scatter_tokens_(hidden + est[0], tokens, out[0]), *out[1:]))

    def run_token_span(
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
            out = self.run_span(bound, streams, start, end)
        finally:
            scratch.token_span = None
        # Every layer must have projected through the wrapped to_k and to_v (fusing them later,
        # e.g. fuse_qkv_projections(), would leave the running queries with their own keys only).
        missing = [
            f"block {j}"
            for j in range(start, end)
            for a in range(len(self.attentions[j]))
            if not {(j, a, "to_k"), (j, a, "to_v")} <= span.fired
        ]
        if missing:
            raise UnsupportedModelError(
                f"token caching: the self-attention of {', '.join(dict.fromkeys(missing))} did "
                "not call its to_k and to_v (fused projections?), so its keys cannot be kept per token"
            )
        return out


class ModuleDriver(BlockDriver):
    """A BranchRule (DeepCache, FORA): named modules whose outputs are replayed on the steps the
    rule skips, while the modules they feed are not run (placeholders of their shapes)."""

    probes = False

    def __init__(self, handle: Handle, blocks: list[nn.Module], replayed: int):
        super().__init__(handle, blocks)
        self.replayed = set(range(replayed))

    @classmethod
    def build(cls, handle: Handle) -> BlockDriver:
        replayed, skipped = handle.rules.block.modules(handle.adapter, handle.model)
        return cls(handle, replayed + skipped, len(replayed))

    def scratch(
        self, gen: Generation, ctx: CallContext, rows: torch.Tensor | None, actions: list[str]
    ) -> CallScratch:
        state = gen.state_for(ctx.branch, "block", self.rule)
        plan = self.handle._agreed(self.rule.plan(ctx, state))
        # A sub-batch cannot use the full batch's cached outputs: it computes.
        modules = gen.module_cache(ctx.branch)
        skipping = not plan and rows is None and modules.ready
        if skipping:
            actions[:] = ["P"] * len(actions)
        return CallScratch(
            ctx=ctx,
            state=state,
            span=None,
            rows=rows,
            row_actions=actions,
            skipping=skipping,
            modules=modules,
        )

    def finish(self, scratch: CallScratch) -> None:
        pass  # modules may run in any order, or more than once

    def forward(self, index: int, args: tuple, kwargs: dict) -> Any:
        _, scratch = self._scratch_of_call()
        if scratch is None:
            return self.orig[index](*args, **kwargs)
        replayed = index in self.replayed
        # A module may run more than once per forward (CogView4's feed-forward, on the image and
        # on the text tokens): each of its calls keeps its own output.
        key = (index, scratch.module_calls.get(index, 0))
        scratch.module_calls[index] = key[1] + 1
        cache = scratch.modules
        assert cache is not None  # set by scratch() for every call of a module-output rule
        known = key in cache.outputs if replayed else key in cache.shapes
        if not scratch.skipping or not known:
            out = self.orig[index](*args, **kwargs)
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


# Each kind of block rule by the interface it implements, the first that matches (TokenRule
# before BlockRule: both are spans, and a token rule is not skipped as a whole). Read once, at enable.
_DRIVERS: dict[type, type[BlockDriver]] = {
    BranchRule: ModuleDriver,
    PerBlockRule: PerBlockDriver,
    TokenRule: TokenDriver,
    BlockRule: SpanDriver,
}


def driver_for(handle: Handle) -> BlockDriver | None:
    """The driver of ``handle``'s block rule, its modules found (None without a block rule)."""
    rule = handle.rules.block
    if rule is None:
        return None
    kind = next((d for interface, d in _DRIVERS.items() if isinstance(rule, interface)), None)
    if kind is None:
        raise TypeError(f"{type(rule).__name__} implements no block-rule interface of stepcache.runtime")
    return kind.build(handle)


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


def _bind_projection(handle: Handle, key: tuple[int, int, str], orig: Any) -> Any:
    # Out of dynamo: whether a span is running is the runtime's Python state.
    @torch.compiler.disable
    def forward(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        gen = handle._current()
        span = gen.call.token_span if gen is not None and gen.call is not None else None
        return out if span is None else _project(span, key, out)

    return forward


def _block_key(scratch: CallScratch) -> tuple:
    # Per span: a rule whose span moves with the step (Delta-DiT) sees residuals of other sizes.
    return (scratch.ctx.branch, "block", scratch.span)


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
