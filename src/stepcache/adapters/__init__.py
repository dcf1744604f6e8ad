"""Adapter registry: find the adapter for a denoiser module, or say which families exist."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, BlockIO
from .generic import CallableDenoiser, GenericAdapter
from .transformers import DiTAdapter, FluxAdapter, PixArtAdapter, SD3Adapter
from .unet import UNetAdapter
from .video import WanAdapter

ADAPTERS: list[type[Adapter]] = [DiTAdapter, PixArtAdapter, SD3Adapter, FluxAdapter, UNetAdapter, WanAdapter]


def supported() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.class_names)})" for a in ADAPTERS)


def adapter_for(model: Any, sample_arg: str | None = None, timestep_arg: str | None = None) -> Adapter:
    """The family adapter of ``model``, or the generic one (step and guidance rules only) for a
    module of any other class."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
        raise UnsupportedModelError(
            f"{type(model).__name__} is a torch.compile wrapper of {type(model._orig_mod).__name__}: "
            "enable stepcache on the module first, then compile it"
        )
    for cls in ADAPTERS:
        if cls.matches(model):
            given = [k for k, v in (("sample_arg", sample_arg), ("timestep_arg", timestep_arg)) if v]
            if given:
                raise UnsupportedModelError(
                    f"{given[0]}: {type(model).__name__} has a family adapter ({cls.family}) that knows "
                    "its arguments; leave it out"
                )
            return cls(model)
    if GenericAdapter.matches(model):
        return GenericAdapter(model, sample_arg, timestep_arg)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a torch module; families with block-level support: {supported()}"
    )


# One module per wrapped callable, so that disable(fn) finds what enable(fn) wrapped.
_WRAPPED: weakref.WeakKeyDictionary[Any, CallableDenoiser] = weakref.WeakKeyDictionary()


def _wrapped(fn: Callable[..., Any]) -> CallableDenoiser:
    try:
        module = _WRAPPED.get(fn)
        if module is None:
            module = _WRAPPED[fn] = CallableDenoiser(fn)
        return module
    except TypeError:  # not weak-referenceable (a bound method): a fresh wrapper each time
        return CallableDenoiser(fn)


def find_denoisers(target: Any) -> dict[str, Any]:
    """Every denoiser of a pipeline by attribute (Wan 2.2: ``transformer`` and ``transformer_2``),
    in the order ``enable`` attaches them; a lone module or callable under ``""``."""
    found = {
        name: module
        for name in ("transformer", "transformer_2", "unet")
        if isinstance(module := getattr(target, name, None), nn.Module) and not isinstance(target, nn.Module)
    }
    return found or {"": find_denoiser(target)}


def find_denoiser(target: Any) -> Any:
    """The denoiser module of a pipeline (``transformer`` or ``unet``), ``target`` itself when it
    is a module, or a module around a plain ``model(x, sigma, **extra)`` callable."""
    if isinstance(target, nn.Module):
        return target
    for name in ("transformer", "unet"):
        module = getattr(target, name, None)
        if isinstance(module, nn.Module):
            return module
    if hasattr(target, "components"):  # a diffusers pipeline whose denoiser has another name
        raise UnsupportedModelError(
            f"{type(target).__name__} has no `transformer` or `unet`; enable stepcache on its "
            "denoiser module instead"
        )
    if callable(target) and not isinstance(target, type):
        return _wrapped(target)
    raise UnsupportedModelError(
        f"{type(target).__name__} is neither a torch module, a callable, nor a pipeline with a "
        f"`transformer` or `unet`; families with block-level support: {supported()}"
    )


__all__ = [
    "ADAPTERS",
    "Adapter",
    "BlockIO",
    "CallableDenoiser",
    "GenericAdapter",
    "adapter_for",
    "find_denoiser",
    "find_denoisers",
    "supported",
]
