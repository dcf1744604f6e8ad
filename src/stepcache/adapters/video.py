"""Adapter for the Wan video transformer (WanTransformer3DModel)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .base import Adapter


class WanAdapter(Adapter):
    family = "Wan"
    class_names = ("WanTransformer3DModel",)
    # Wan blocks take (hidden_states, encoder_hidden_states, temb, rotary_emb) and return hidden_states.
    unbatched_args = frozenset({"rotary_emb"})
    # Wan pipelines run the unconditional pass as a second call per step, not a batched half.
    pipeline_cfg_layout = None

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def modulated_input(self, block: nn.Module, bound: inspect.BoundArguments) -> torch.Tensor:
        h, temb = bound.arguments["hidden_states"], bound.arguments["temb"]
        if temb.dim() == 4:  # per-token modulation (Wan 2.2 TI2V): (B, L, 6, D)
            shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        return block.norm1(h.float()) * (1 + scale) + shift
