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
# The tools on a user's pipeline; ``search`` and ``bench`` are callable modules of the same names.
_LAZY_NAMES = {
    "compare": ("tools", "compare"),
    "calibrate": ("tools", "calibrate"),
    "Workload": ("workload", "Workload"),
    "load_pipeline": ("pipelines", "load_pipeline"),
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        module, attr = _LAZY_NAMES[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'stepcache' has no attribute {name!r}")


__all__ = [
    "Handle",
    "Policy",
    "PolicyError",
    "UnsupportedModelError",
    "Workload",
    "bench",
    "calibrate",
    "compare",
    "compose",
    "metrics",
    "disable",
    "enable",
    "load_pipeline",
    "presets",
    "resolve_policy",
    "search",
    "zoo",
]
