"""Row and stream helpers the runtime's levels share: a rule's plan resolved over the rows of a
call, CFG pairs tied to one decision, and the guard's per-row range check."""

from __future__ import annotations

from typing import Any

import torch

from .interfaces import CallContext, Streams, take

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
