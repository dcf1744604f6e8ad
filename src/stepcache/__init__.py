"""stepcache: training-free, gradient-free acceleration of diffusion sampling, per step and per sample."""

from typing import Any

from . import presets
from .api import disable, enable, resolve_policy
from .errors import PolicyError, UnsupportedModelError
from .policy import Policy, compose
from .runtime import Handle

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # torchmetrics pulls in scipy and transformers (seconds): load the metrics when first used.
    if name == "metrics":
        import importlib

        return importlib.import_module(".metrics", __name__)
    raise AttributeError(f"module 'stepcache' has no attribute {name!r}")


__all__ = [
    "Handle",
    "Policy",
    "PolicyError",
    "UnsupportedModelError",
    "compose",
    "metrics",
    "disable",
    "enable",
    "presets",
    "resolve_policy",
]
