"""Adapter for diffusers U-Nets (UNet2DModel, UNet2DConditionModel)."""

from __future__ import annotations

from torch import nn

from .base import Adapter


class UNetAdapter(Adapter):
    family = "UNet"
    class_names = ("UNet2DModel", "UNet2DConditionModel")
    hidden_arg = "sample"

    # A U-Net has skip connections between down and up blocks, so it has no linear block stack
    # for head/middle/tail spans; its groups serve the U-Net methods (DeepCache).
    def blocks(self) -> None:
        return None

    def block_groups(self) -> dict[str, list[nn.Module]]:
        mid = [self.model.mid_block] if getattr(self.model, "mid_block", None) is not None else []
        return {"down": list(self.model.down_blocks), "mid": mid, "up": list(self.model.up_blocks)}
