"""Adapters for the diffusers image transformers: DiT, PixArt, SD3 (MMDiT) and FLUX."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .base import Adapter, BlockIO

# Joint (two-stream) blocks take (hidden_states, encoder_hidden_states, ...) and return
# (encoder_hidden_states, hidden_states).
JOINT_IO = BlockIO(streams=("hidden_states", "encoder_hidden_states"), out_index=(1, 0))


class DiTAdapter(Adapter):
    family = "DiT"
    class_names = ("DiTTransformer2DModel",)
    pipeline_cfg_layout = "uncond_last"

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer_blocks)

    def uncond_rows(self, bound: inspect.BoundArguments, cfg_layout: str | None) -> torch.Tensor | None:
        # DiT's label table reserves index num_embeds_ada_norm for the null (unconditional) class,
        # so the rows identify themselves whatever order the caller batched them in.
        labels = bound.arguments.get("class_labels")
        if isinstance(labels, torch.Tensor):
            return labels.reshape(-1) == int(self.model.config.num_embeds_ada_norm)
        return super().uncond_rows(bound, cfg_layout)


class PixArtAdapter(Adapter):
    family = "PixArt"
    class_names = ("PixArtTransformer2DModel",)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer_blocks)


class SD3Adapter(Adapter):
    family = "SD3"
    class_names = ("SD3Transformer2DModel",)
    block_io = JOINT_IO

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer_blocks)


class FluxAdapter(Adapter):
    family = "FLUX"
    class_names = ("FluxTransformer2DModel",)
    block_io = JOINT_IO
    unbatched_args = frozenset({"img_ids", "txt_ids", "image_rotary_emb"})
    # FLUX pipelines run true CFG as a second call per step, never as a batched half.
    pipeline_cfg_layout = None

    def blocks(self) -> list[nn.Module]:
        # Double-stream then single-stream blocks: one sequence for head / middle / tail spans.
        return list(self.model.transformer_blocks) + list(self.model.single_transformer_blocks)

    def block_groups(self) -> dict[str, list[nn.Module]]:
        return {
            "double": list(self.model.transformer_blocks),
            "single": list(self.model.single_transformer_blocks),
        }
