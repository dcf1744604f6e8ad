"""stepcache: training-free, gradient-free acceleration of diffusion sampling, per step and per sample."""

from typing import Any

from . import presets
from .api import disable, enable, resolve_policy
from .errors import PolicyError, UnsupportedModelError
from .policy import Policy, compose
from .runtime import Handle

__version__ = "0.1.0"


# Loaded when first used: torchmetrics pulls in scipy and transformers, the search Optuna, the
# zoo and bench diffusers' pipelines (seconds each); ``import stepcache`` stays light.
_LAZY = ("metrics", "zoo", "bench", "search")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'stepcache' has no attribute {name!r}")


__all__ = [
    "Handle",
    "Policy",
    "PolicyError",
    "UnsupportedModelError",
    "bench",
    "compose",
    "metrics",
    "disable",
    "enable",
    "presets",
    "resolve_policy",
    "search",
    "zoo",
]
