"""Adapter for diffusers U-Nets: UNet2DModel, UNet2DConditionModel by name, and any other module
built the same way (a ``sample`` argument, ``down_blocks`` and ``up_blocks`` lists of equal length:
the 3-D, spatio-temporal, motion and image-to-video U-Nets), found from its module tree."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .base import Adapter


class UNetAdapter(Adapter):
    family = "UNet"
    class_names = ("UNet2DModel", "UNet2DConditionModel")
    hidden_arg = "sample"

    @classmethod
    def matches(cls, model: Any) -> bool:
        if super().matches(model):
            return True
        down, up = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
        if not (isinstance(down, nn.ModuleList) and isinstance(up, nn.ModuleList)):
            return False
        if len(down) < 2 or len(down) != len(up):
            return False
        if any(isinstance(b, nn.ModuleList) for b in [*down, *up]):
            return False  # lists of lists the model loops over itself (Stable Cascade): no branches to cache
        try:  # the class's forward: an enabled model's own is stepcache's (*args, **kwargs)
            return "sample" in inspect.signature(type(model).forward).parameters
        except (TypeError, ValueError):
            return False

    # A U-Net has skip connections between down and up blocks, so it has no linear block stack
    # for head/middle/tail spans; its groups serve the U-Net methods (DeepCache).
    def blocks(self) -> None:
        return None

    def branch_split(self, branch: int) -> tuple[list[nn.Module], nn.Module | None]:
        """(modules a DeepCache skip leaves out, the one whose output is the cached deep feature).

        Skip branch ``b`` keeps conv_in, down_blocks[:b+1], up_blocks[D-1-b:] and conv_out
        running; everything deeper is skipped. Nothing is deeper than the last branch.
        """
        down, up = list(self.model.down_blocks), list(self.model.up_blocks)
        keep_up = len(up) - 1 - branch
        if branch >= len(down) - 1 or keep_up <= 0:
            return [], None
        mid = [self.model.mid_block] if getattr(self.model, "mid_block", None) is not None else []
        skipped = down[branch + 1 :] + mid + up[:keep_up]
        return skipped, up[keep_up - 1]

    def block_groups(self) -> dict[str, list[nn.Module]]:
        mid = [self.model.mid_block] if getattr(self.model, "mid_block", None) is not None else []
        return {"down": list(self.model.down_blocks), "mid": mid, "up": list(self.model.up_blocks)}
