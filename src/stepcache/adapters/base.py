"""What the runtime needs to know about a model family, and nothing more.

An adapter names the denoiser's arguments (hidden states, timestep), lists its block stack in
execution order, says how a block's inputs and outputs carry the hidden streams, and finds the
unconditional rows of a batched classifier-free-guidance call.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Streams = tuple[torch.Tensor | None, ...]


@dataclass(frozen=True)
class BlockIO:
    """How a block carries hidden streams: argument names in, and positions in its output.

    ``out_index`` is None when the block returns a single tensor (stream 0); otherwise
    ``out_index[k]`` is where stream ``k`` sits in the returned tuple, whose other items (up to
    ``out_len``) are None (Kandinsky 6's audio stream in a video-only call).
    """

    streams: tuple[str, ...] = ("hidden_states",)
    out_index: tuple[int, ...] | None = None
    out_len: int = 0

    def read_in(self, bound: inspect.BoundArguments) -> Streams:
        return tuple(bound.arguments.get(name) for name in self.streams)

    def read_out(self, out: Any) -> Streams:
        if self.out_index is None:
            return (out,)
        return tuple(out[i] for i in self.out_index)

    def format_out(self, streams: Streams) -> Any:
        if self.out_index is None:
            return streams[0]
        out: list[Any] = [None] * max(self.out_len, max(self.out_index) + 1)
        for k, i in enumerate(self.out_index):
            out[i] = streams[k]
        return tuple(out)


class Adapter:
    """Base adapter; subclasses set the class names and override what differs."""

    family = "base"
    class_names: tuple[str, ...] = ()
    hidden_arg = "hidden_states"
    timestep_arg = "timestep"
    # Tensor arguments whose first dimension is not the batch (e.g. positional embeddings).
    unbatched_args: frozenset[str] = frozenset()
    block_io = BlockIO()
    # Where a diffusers pipeline of this family puts the unconditional half when it batches CFG.
    pipeline_cfg_layout: str | None = "uncond_first"

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: Any) -> bool:
        return any(c.__name__ in cls.class_names for c in type(model).__mro__)

    # ---- denoiser call ----------------------------------------------------------------
    def batch_size(self, bound: inspect.BoundArguments) -> int:
        return int(bound.arguments[self.hidden_arg].shape[0])

    def timestep(self, bound: inspect.BoundArguments) -> Any:
        return bound.arguments.get(self.timestep_arg)

    def uncond_rows(self, bound: inspect.BoundArguments, cfg_layout: str | None) -> torch.Tensor | None:
        """Bool mask over the batch of the unconditional rows, or None when the call has no CFG half."""
        if cfg_layout is None:
            return None  # no batched CFG in this call (or the caller did not say)
        batch = self.batch_size(bound)
        if batch % 2:
            return None
        device = bound.arguments[self.hidden_arg].device
        mask = torch.zeros(batch, dtype=torch.bool, device=device)
        half = batch // 2
        if cfg_layout == "uncond_first":
            mask[:half] = True
        else:
            mask[half:] = True
        return mask

    # ---- blocks -------------------------------------------------------------------------
    # A family adapter knows its blocks' streams; a discovering one reads them from one call.
    needs_probe = False

    def probe(
        self, blocks: list[nn.Module], signatures: list[inspect.Signature], run: Any, batch: int
    ) -> None:
        """Learn what the blocks carry from one real call of the model (``run()``, ``batch`` rows)."""

    def blocks(self) -> list[nn.Module] | None:
        """The repeated blocks in execution order, or None when the model has no linear stack."""
        return None

    def feature_modules(self) -> list[nn.Module]:
        """Each block's attention and feed-forward layers, in execution order (FORA's cache)."""
        out = []
        for blk in self.blocks() or []:
            for child in blk.children():
                name = type(child).__name__
                if name.endswith("Attention") or name == "FeedForward":
                    out.append(child)
        return out

    def modulated_input(self, block: nn.Module, bound: inspect.BoundArguments) -> torch.Tensor | None:
        """The first block's timestep-modulated input (TeaCache's indicator), computed from the
        block's call arguments; None where the family has no such tensor."""
        return None

    def block_groups(self) -> dict[str, list[nn.Module]]:
        blocks = self.blocks()
        return {"blocks": blocks} if blocks is not None else {}

    # ---- batch slicing (per-sample decisions) ---------------------------------------------
    def slice_rows(
        self, bound: inspect.BoundArguments, rows: torch.Tensor, batch: int
    ) -> inspect.BoundArguments:
        """A copy of a call's arguments restricted to ``rows`` of the batch."""
        new = inspect.BoundArguments(bound.signature, bound.arguments.copy())
        for name, value in bound.arguments.items():
            if name not in self.unbatched_args:
                new.arguments[name] = _slice(value, rows, batch)
        return new


def _slice(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, Mapping):
        return {k: _slice(v, rows, batch) for k, v in value.items()}
    if type(value) in (tuple, list):  # e.g. rotary (cos, sin) with a batch dimension (LTX)
        return type(value)(_slice(v, rows, batch) for v in value)
    return value
