"""Adapters for the diffusers image transformers: DiT, PixArt, SD3 (MMDiT) and FLUX."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .base import Adapter, BlockIO

# Joint (two-stream) blocks take (hidden_states, encoder_hidden_states, ...) and return
# (encoder_hidden_states, hidden_states).
JOINT_IO = BlockIO(streams=("hidden_states", "encoder_hidden_states"), out_index=(1, 0))


def _ada_norm_zero(block: nn.Module, bound: inspect.BoundArguments) -> torch.Tensor:
    """norm1(hidden, emb=temb)[0] of an SD3 / FLUX block: the adaLN-modulated input."""
    return block.norm1(bound.arguments["hidden_states"], emb=bound.arguments["temb"])[0]


def _ada_norm_single(block: nn.Module, bound: inspect.BoundArguments) -> torch.Tensor:
    """PixArt's block: the (B, 6D) timestep embedding plus the block's table give shift and scale."""
    h = bound.arguments["hidden_states"]
    t = bound.arguments["timestep"]
    shift, scale = (block.scale_shift_table[None] + t.reshape(h.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    return block.norm1(h) * (1 + scale) + shift


class DiTAdapter(Adapter):
    family = "DiT"
    class_names = ("DiTTransformer2DModel",)
    pipeline_cfg_layout = "uncond_last"

    def modulated_input(self, block: nn.Module, bound: inspect.BoundArguments) -> torch.Tensor:
        h = bound.arguments["hidden_states"]
        args = bound.arguments
        return block.norm1(h, args["timestep"], args["class_labels"], hidden_dtype=h.dtype)[0]

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

    def modulated_input(self, block: nn.Module, bound: inspect.BoundArguments) -> torch.Tensor:
        return _ada_norm_single(block, bound)


class SD3Adapter(Adapter):
    family = "SD3"
    class_names = ("SD3Transformer2DModel",)
    block_io = JOINT_IO

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer_blocks)

    def modulated_input(self, block: nn.Module, bound: inspect.BoundArguments) -> torch.Tensor:
        return _ada_norm_zero(block, bound)


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

    def modulated_input(self, block: nn.Module, bound: inspect.BoundArguments) -> torch.Tensor:
        return _ada_norm_zero(block, bound)

    def block_groups(self) -> dict[str, list[nn.Module]]:
        return {
            "double": list(self.model.transformer_blocks),
            "single": list(self.model.single_transformer_blocks),
        }
