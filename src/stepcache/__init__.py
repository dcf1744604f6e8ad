"""stepcache: training-free, gradient-free acceleration of diffusion sampling, per step and per sample."""

from . import metrics, presets
from .api import disable, enable, resolve_policy
from .errors import PolicyError, UnsupportedModelError
from .policy import Policy, compose
from .runtime import Handle

__version__ = "0.1.0"

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
