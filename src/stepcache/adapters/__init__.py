"""Adapter registry: find the adapter for a denoiser module, or say which families exist."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, BlockIO
from .transformers import DiTAdapter, FluxAdapter, PixArtAdapter, SD3Adapter
from .unet import UNetAdapter
from .video import WanAdapter

ADAPTERS: list[type[Adapter]] = [DiTAdapter, PixArtAdapter, SD3Adapter, FluxAdapter, UNetAdapter, WanAdapter]


def supported() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.class_names)})" for a in ADAPTERS)


def adapter_for(model: Any) -> Adapter:
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
        raise UnsupportedModelError(
            f"{type(model).__name__} is a torch.compile wrapper of {type(model._orig_mod).__name__}: "
            "enable stepcache on the module first, then compile it"
        )
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise UnsupportedModelError(
        f"stepcache has no adapter for {type(model).__name__}; supported families: {supported()}"
    )


def find_denoiser(target: Any) -> Any:
    """The denoiser module of a pipeline (``transformer`` or ``unet``), or ``target`` itself."""
    if isinstance(target, nn.Module):
        return target
    for name in ("transformer", "unet"):
        module = getattr(target, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(
        f"{type(target).__name__} is neither a torch module nor a pipeline with a `transformer` or "
        f"`unet`; supported families: {supported()}"
    )


__all__ = ["ADAPTERS", "Adapter", "BlockIO", "adapter_for", "find_denoiser", "supported"]
