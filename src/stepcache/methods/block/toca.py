"""Token-wise caching (Zou et al., 2024, "Accelerating Diffusion Transformers with Token-wise
Feature Caching" (ToCa); also RAS, Liu et al., 2025). Tokens do not change at one pace: between
full steps, run the block stack only on the tokens whose input moved most since they last ran,
and let the others reuse the residual they had then; attention still sees every token.

Every ``interval``-th step (after ``warmup``) runs every token. On the steps between, each
sample picks its own ``ratio`` of tokens (largest relative L1 change of the span's input per
token since that token last ran); the runtime keeps every self-attention layer's keys and values,
so the running tokens attend to all tokens. Only models whose positions are added before the
blocks qualify (DiT, PixArt, SD3); rotary models (FLUX, Wan) are refused by name.

Memory: the span's input and residual per token, and each self-attention layer's keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...policy import Param, RuleSchema
from ...runtime import (
    CallContext,
    TokenRule,
    gather_tokens,
    put,
    put_streams,
    scatter_tokens_,
    take,
    take_streams,
)
from ...runtime.interfaces import Streams
from .. import Method
from ..maths import on_schedule

SCHEMA = RuleSchema(
    method="toca",
    level="block",
    summary="between full steps, run the blocks only on the tokens that changed most; the rest reuse",
    params={
        "ratio": Param("float", 0.3, "share of the tokens that run between full steps", min=0.0, max=1.0),
        "interval": Param("int", 3, "every interval-th step runs every token", min=1, max=1000),
        "warmup": Param("int", 2, "steps computed in full at the start", min=0, max=100_000),
        "fn": Param("int", 0, "leading blocks always run on every token", min=0),
        "bn": Param("int", 0, "trailing blocks always run on every token", min=0),
    },
)


@dataclass
class TokenCaches:
    """Per row and token: the span's input (first stream) and residual (every stream) when the
    token last ran; ``seen``: rows that have run every token once."""

    inputs: torch.Tensor | None = None
    residuals: Streams | None = None
    seen: torch.Tensor | None = None


def _scatter_rows(
    store: torch.Tensor, rows: torch.Tensor | None, tokens: torch.Tensor, value: torch.Tensor, batch: int
) -> torch.Tensor:
    """Write ``value`` (active rows, k, C) at ``tokens`` of the given rows of a full-batch cache."""
    part = scatter_tokens_(take(store, rows).clone(), tokens, value.detach())
    return part if rows is None else put(store, rows, part, batch)


class TokenCache(TokenRule):
    def __init__(self, ratio: float, interval: int, warmup: int, fn: int, bn: int):
        self.ratio, self.interval, self.warmup, self.fn, self.bn = ratio, interval, warmup, fn, bn

    def span(self, num_blocks: int) -> tuple[int, int]:
        head_end = min(self.fn, num_blocks)
        return head_end, max(head_end, num_blocks - self.bn)

    def new_state(self) -> TokenCaches:
        return TokenCaches()

    def plan(self, ctx: CallContext, state: TokenCaches, block_in: Streams) -> torch.Tensor | None:
        x = block_in[0]
        if state.inputs is None or state.inputs.shape[1:] != x.shape[1:] or state.seen is None:
            return None
        seen = state.seen if ctx.rows is None else state.seen[ctx.rows.cpu()]
        if not bool(seen.all()) or on_schedule(ctx.step, self.interval, self.warmup):
            return None
        k = round(self.ratio * x.shape[1])
        if k >= x.shape[1]:
            return None
        before = take(state.inputs, ctx.rows)
        change = (x - before).abs().mean(-1) / before.abs().mean(-1).clamp_min(1e-8)
        return change.topk(k, dim=1).indices.sort(dim=1).values

    def estimate(self, ctx: CallContext, state: TokenCaches, rows: torch.Tensor | None) -> Streams:
        assert state.residuals is not None  # plan runs every token until residuals exist
        return take_streams(state.residuals, rows)

    def observe(
        self,
        ctx: CallContext,
        state: TokenCaches,
        block_in: Streams,
        residual: Streams,
        tokens: torch.Tensor | None,
        rows: torch.Tensor | None,
    ) -> None:
        if tokens is None:
            state.inputs = put(state.inputs, rows, block_in[0], ctx.batch)
            state.residuals = put_streams(state.residuals, rows, residual, ctx.batch)
            if state.seen is None or state.seen.shape[0] != ctx.batch:
                state.seen = torch.zeros(ctx.batch, dtype=torch.bool)
            state.seen[slice(None) if rows is None else rows.cpu()] = True
            return
        assert state.inputs is not None and state.residuals is not None
        state.inputs = _scatter_rows(
            state.inputs, rows, tokens, gather_tokens(block_in[0], tokens), ctx.batch
        )
        first = _scatter_rows(state.residuals[0], rows, tokens, residual[0], ctx.batch)
        rest = put_streams(state.residuals[1:], rows, residual[1:], ctx.batch)
        state.residuals = (first, *rest)


METHOD = Method(
    schema=SCHEMA,
    rule=TokenCache,
    preset="ToCa: all tokens every 3rd step; in between the 30% of tokens that changed most, the rest reuse.",
    sweep=({}, {"ratio": 0.15}),
)
