"""Adapter for the Wan video transformer (WanTransformer3DModel)."""

from __future__ import annotations

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
