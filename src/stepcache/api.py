"""The public entry points: enable, disable, and turning anything policy-like into a Policy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import methods, presets
from .adapters import adapter_for, find_denoiser
from .errors import PolicyError
from .policy import Policy
from .runtime import Handle, attach, detach

PolicyLike = Policy | str | os.PathLike | Mapping[str, Any] | None


def resolve_policy(policy: PolicyLike) -> Policy:
    """A Policy from a Policy, preset name, path to a JSON file, dict, or None (always compute)."""
    if policy is None:
        return Policy.from_dict({"schema": "stepcache.policy/1", "name": "always-compute", "rules": {}})
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return Policy.from_dict(policy)
    if isinstance(policy, str) and policy in presets.names():
        return presets.get(policy)
    if isinstance(policy, (str, os.PathLike)):
        path = Path(policy)
        if path.suffix == ".json" or path.exists():
            return Policy.load(path)
        raise PolicyError(
            f"policy: {str(policy)!r} is neither a preset ({', '.join(presets.names())}) nor a policy file"
        )
    raise PolicyError(f"policy: expected a Policy, preset name, path or dict, got {type(policy).__name__}")


def enable(pipe_or_module: Any, policy: PolicyLike = None) -> Handle:
    """Attach ``policy`` to a diffusers pipeline or a bare denoiser module; returns the handle.

    Enabling again replaces the previous policy. Nothing about the classes changes; ``disable``
    restores the exact original objects.
    """
    pol = resolve_policy(policy)
    model = find_denoiser(pipe_or_module)
    adapter = adapter_for(model)
    return attach(pipe_or_module, model, adapter, methods.build(pol), pol)


def disable(pipe_or_module: Any) -> None:
    """Remove stepcache from a pipeline or module; a no-op when it is not enabled."""
    detach(find_denoiser(pipe_or_module))
